//! The command line.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "testflinger",
    version,
    about = "Testflinger command-line client"
)]
pub struct Cli {
    /// Server URL (default: config `server`, then $TESTFLINGER_SERVER).
    #[arg(long, global = true)]
    pub server: Option<String>,

    /// Config file (default: $XDG_CONFIG_HOME/testflinger-cli.conf).
    #[arg(short = 'c', long = "configfile", global = true)]
    pub configfile: Option<PathBuf>,

    /// Print every HTTP request on stderr. Before the command, as upstream
    /// (`testflinger -d status ID`): after it, `-d` is the command's own (`reserve -d` is
    /// `--dry-run`); `--debug` works anywhere.
    #[arg(short = 'd', long)]
    pub debug: bool,

    /// Client id for authentication (default: config `client_id`, then
    /// $TESTFLINGER_CLIENT_ID, then the stored login).
    #[arg(long, global = true, alias = "client_id")]
    pub client_id: Option<String>,

    /// Secret key of the client id (default: config `secret_key`, then
    /// $TESTFLINGER_SECRET_KEY).
    #[arg(long, global = true, alias = "secret_key")]
    pub secret_key: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

/// The exit statuses of `poll`, `poll-serial` and `submit --poll`.
pub const POLL_EXIT_CODES: &str = "Exit status: 0 the job completed and every phase exited 0; \
1 the CLI failed (one `error:` line); 2 bad command line; 3 the job was cancelled; \
4 a phase exited non-zero (a failed test, provision or reservation; 241 and 247 mean the \
phase was killed by SIGTERM or SIGKILL: a timeout, a cancel or the agent stopping it); \
5 the server ended the job without a result (its agent was lost too often); \
130 interrupted.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job (YAML or JSON; `-` reads stdin).
    #[command(after_help = POLL_EXIT_CODES)]
    Submit(SubmitArgs),
    /// Follow a job's output until it completes or is cancelled.
    #[command(after_help = POLL_EXIT_CODES)]
    Poll(PollArgs),
    /// Follow a job's serial output until it completes or is cancelled.
    #[command(name = "poll-serial", after_help = POLL_EXIT_CODES)]
    PollSerial(PollArgs),
    /// Print a job's state.
    Status(JobArg),
    /// Print a job's results as JSON.
    Results(JobArg),
    /// Download a job's artifacts archive.
    Artifacts(ArtifactsArgs),
    /// Print a job's definition.
    Show(ShowArgs),
    /// Cancel a job.
    Cancel(JobArg),
    /// List the queues advertised on the server.
    #[command(name = "list-queues")]
    ListQueues(JsonFlag),
    /// List the agents known to the server.
    #[command(name = "list-agents")]
    ListAgents(ListAgentsArgs),
    /// Show one agent.
    #[command(name = "agent-status")]
    AgentStatus(AgentStatusArgs),
    /// Show the agents and jobs of a queue.
    #[command(name = "queue-status")]
    QueueStatus(QueueStatusArgs),
    /// Reserve a device over SSH.
    Reserve(ReserveArgs),
    /// Show the jobs submitted from this machine (last 10).
    Jobs(JobsArgs),
    /// Print the config, or set `key=value` in it.
    Config(ConfigArgs),
    /// Authenticate with --client-id/--secret-key and store the login for this server.
    Login,
    /// Write or delete a secret of your client (used by jobs' `test_data.secrets`).
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Administration: agent status, client permissions, restricted queues.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Job file (YAML or JSON), or `-` for stdin.
    pub filename: String,
    /// Follow the job's output after submitting it.
    #[arg(short = 'p', long)]
    pub poll: bool,
    /// Print only the job id.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Submit even if no agent can take the job now.
    #[arg(long)]
    pub wait_for_available_agents: bool,
    /// Directory that relative attachment paths are relative to (default: the job
    /// file's directory).
    #[arg(long)]
    pub attachments_relative_to: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct PollArgs {
    pub job_id: String,
    /// Print the output once and exit.
    #[arg(short = 'o', long)]
    pub oneshot: bool,
    /// First fragment to print.
    #[arg(
        short = 'f',
        long = "start_fragment",
        alias = "start-fragment",
        default_value_t = 0
    )]
    pub start_fragment: u64,
    /// Only fragments at or after this ISO-8601 timestamp.
    #[arg(short = 't', long = "start_timestamp", alias = "start-timestamp")]
    pub start_timestamp: Option<String>,
    /// Only this phase's output; stop once the phase has finished.
    #[arg(short = 'p', long)]
    pub phase: Option<String>,
    /// Print the server's log responses as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JobArg {
    pub job_id: String,
}

#[derive(Debug, Args)]
pub struct ArtifactsArgs {
    pub job_id: String,
    /// Where to save the archive.
    #[arg(long, default_value = "artifacts.tgz")]
    pub filename: PathBuf,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub job_id: String,
    /// Print YAML instead of JSON.
    #[arg(long)]
    pub yaml: bool,
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AgentStatusArgs {
    pub agent_name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct QueueStatusArgs {
    pub queue_name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Also list the queue's agents and its waiting jobs in order.
    #[arg(short = 'v', long)]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct ListAgentsArgs {
    /// Print JSON.
    #[arg(long, conflicts_with_all = ["one_per_line", "summary"])]
    pub json: bool,
    /// Print only the names, one per line.
    #[arg(short = '1', long = "one-per-line", conflicts_with = "summary")]
    pub one_per_line: bool,
    /// Print how many agents are in each state.
    #[arg(long)]
    pub summary: bool,
    /// Columns to show, comma-separated (name, state, location, provision_type,
    /// comment, job_id, queues).
    #[arg(long, value_delimiter = ',')]
    pub fields: Vec<String>,
    /// Only agents in these states (repeatable or comma-separated).
    #[arg(long = "filter-status", value_delimiter = ',')]
    pub filter_status: Vec<String>,
    /// Only agents whose name matches this regular expression.
    #[arg(long = "filter-name")]
    pub filter_name: Option<String>,
    /// Only agents that serve this queue.
    #[arg(long = "filter-queue")]
    pub filter_queue: Option<String>,
    /// Only agents at this location.
    #[arg(long = "filter-location")]
    pub filter_location: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReserveArgs {
    /// Queue to reserve a device on (asked for when omitted and the terminal is
    /// interactive).
    #[arg(short = 'q', long)]
    pub queue: Option<String>,
    /// Image to provision, from the queue's advertised images.
    #[arg(short = 'i', long, conflicts_with = "distro")]
    pub image: Option<String>,
    /// Distro to provision (MAAS).
    #[arg(long)]
    pub distro: Option<String>,
    /// With --distro: provision an ephemeral (in-memory) system.
    #[arg(long, requires = "distro")]
    pub ephemeral: bool,
    /// SSH key for the reservation (repeatable): `lp:<user>`, `gh:<user>`, an OpenSSH
    /// public key line, or the path of a public key file.
    #[arg(short = 'k', long = "key")]
    pub keys: Vec<String>,
    /// Reservation length: seconds or a duration such as `2h30m`.
    #[arg(long, default_value = "3600")]
    pub timeout: String,
    /// Print the job and do not submit it.
    #[arg(short = 'd', long)]
    pub dry_run: bool,
    /// Submit without asking.
    #[arg(short = 'y', long)]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Ask the server for each job's current state.
    #[arg(short = 's', long)]
    pub status: bool,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// `key=value` to set; nothing prints the config.
    pub setting: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Store a secret under PATH (letters, digits, '_', '-', '/').
    Write {
        path: String,
        value: String,
        /// Delete the secret after this many seconds.
        #[arg(long, conflicts_with = "single_use")]
        expire_after: Option<u64>,
        /// Delete the secret once a job has read it.
        #[arg(long)]
        single_use: bool,
    },
    /// Delete the secret at PATH.
    Delete { path: String },
}

#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Set something.
    #[command(subcommand)]
    Set(AdminSet),
    /// Show something.
    #[command(subcommand)]
    Get(AdminGet),
    /// Delete something.
    #[command(subcommand)]
    Delete(AdminDelete),
}

#[derive(Debug, Subcommand)]
pub enum AdminSet {
    /// Set agents' state: online (waiting), offline or maintenance, with a comment.
    #[command(name = "agent-status")]
    AgentStatus {
        #[arg(long)]
        status: String,
        #[arg(long, num_args = 1.., required = true)]
        agents: Vec<String>,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Create or update a client.
    #[command(name = "client-permissions")]
    ClientPermissions {
        /// The client to create or change.
        client: String,
        /// Its secret (at least 15 characters; required when creating).
        #[arg(long)]
        client_secret: Option<String>,
        /// admin, manager, contributor or agent.
        #[arg(long)]
        role: Option<String>,
        /// QUEUE=N (or *=N for every queue), repeatable.
        #[arg(long = "max-priority")]
        max_priority: Vec<String>,
        /// QUEUE=SECONDS (or *=SECONDS), repeatable.
        #[arg(long = "max-reservation-time")]
        max_reservation_time: Vec<String>,
        #[arg(long)]
        email: Option<String>,
        /// For an agent client: the agent it stands for (default: the client id; admin only).
        #[arg(long)]
        agent_id: Option<String>,
        /// For an agent client: a queue it may serve, repeatable (default: the queues it
        /// registers); `--agent-queue ''` alone removes them.
        #[arg(long = "agent-queue")]
        agent_queues: Vec<String>,
    },
    /// Restrict a queue to a client (repeat for more owners).
    #[command(name = "restricted-queue")]
    RestrictedQueue {
        queue: String,
        #[arg(long)]
        owner: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminGet {
    /// One client's permissions, or every client's.
    #[command(name = "client-permissions")]
    ClientPermissions { client: Option<String> },
    /// One restricted queue, or all.
    #[command(name = "restricted-queues")]
    RestrictedQueues { queue: Option<String> },
}

#[derive(Debug, Subcommand)]
pub enum AdminDelete {
    /// Delete a client.
    #[command(name = "client-permissions")]
    ClientPermissions { client: String },
    /// Lift a queue's restriction.
    #[command(name = "restricted-queue")]
    RestrictedQueue {
        queue: String,
        #[arg(long)]
        owner: String,
    },
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: CompletionShell,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}
