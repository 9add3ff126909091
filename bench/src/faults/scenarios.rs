//! The fault scenarios: each builds a [`World`], runs its fault schedule under load,
//! and returns the world's figures.

use super::Stack;
use super::ledger::{TestShape, uptime};
use super::proxy::Proxy;
use super::stack::{Rabbit, StackDir};
use super::world::{LEASE_S, Setup, World};
use crate::harness::Ctx;
use anyhow::Context;
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

pub const ALL: [&str; 7] = [
    "agent-kill",
    "agent-freeze",
    "broker-restart",
    "broker-cluster",
    "redis-restart",
    "api-restart",
    "partition",
];

/// Longer than a lease: the outage a survivor cannot renew through.
fn beyond_lease() -> Duration {
    Duration::from_secs(2 * LEASE_S + 2)
}

/// Short tests, a few long ones (longer than a lease, so a test left behind by a dead
/// agent is still running when its job is handed out again).
const MIXED: TestShape = TestShape {
    short_ms: (100, 800),
    long_ms: (3000, 9000),
    long_pct: 8,
    line_ms: 100,
};

/// Tests long enough to be caught mid-run by a freeze or a partition.
const LONG: TestShape = TestShape {
    short_ms: (500, 2000),
    long_ms: (6000, 15000),
    long_pct: 40,
    line_ms: 150,
};

fn setup(name: &'static str, agents: usize, shape: TestShape) -> Setup {
    Setup {
        name,
        agents,
        shape,
        backlog: agents * 2,
        jobs: None,
        amqp_uri: None,
        server_env: Vec::new(),
        agent_yaml: String::new(),
        replicas: 1,
        proxied_agents: Vec::new(),
    }
}

pub async fn run(name: &str, ctx: &Ctx, stack: &mut Stack) -> anyhow::Result<Map<String, Value>> {
    let q = ctx.quick();
    match name {
        "agent-kill" => agent_kill(ctx, q).await,
        "agent-freeze" => agent_freeze(ctx, q).await,
        "broker-restart" => broker_restart(ctx, q, &mut stack.rabbit).await,
        "broker-cluster" => broker_cluster(ctx, q, &stack.dir, &stack.run_id).await,
        "redis-restart" => redis_restart(ctx, q, stack).await,
        "api-restart" => api_restart(ctx, q).await,
        "partition" => partition(ctx, q).await,
        other => anyhow::bail!("unknown scenario {other}"),
    }
}

fn drain(quick: bool) -> Duration {
    Duration::from_secs(if quick { 90 } else { 300 })
}

/// The agent whose test has the longest still to go (preferably longer than a lease
/// and a bit: the case where a test outlives its lease), else any busy agent.
async fn victim(w: &mut World<'_>) -> usize {
    match w
        .longest_busy((LEASE_S + 3) as f64, Duration::from_secs(30))
        .await
    {
        Some(i) => i,
        None => w.busy_agent(),
    }
}

/// Scenario 1: Agents SIGKILLed every 2 s and restarted at once (every fourth under a new id).
async fn agent_kill(ctx: &Ctx, quick: bool) -> anyhow::Result<Map<String, Value>> {
    let agents = ctx.opts.agents.unwrap_or(if quick { 4 } else { 20 });
    let jobs = ctx.opts.jobs.unwrap_or(if quick { 300 } else { 10_000 });
    let mut s = setup("agent-kill", agents, MIXED);
    s.jobs = Some(jobs);
    let mut w = World::start(ctx, s).await?;
    w.start_submitting();
    let limit = Instant::now() + Duration::from_secs(if quick { 300 } else { 3600 });
    let mut kills = 0usize;
    while w.ended_jobs() + agents < jobs && Instant::now() < limit {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let i = w.busy_agent();
        if kills.is_multiple_of(10) {
            w.spawn_probe();
        }
        let t0 = uptime();
        let victims = w.kill_agent(i).await;
        kills += 1;
        if kills.is_multiple_of(4) {
            w.rename_agent(i);
        }
        w.launch_agent(i)?;
        w.fault(format!("SIGKILL agent {i}"), t0, victims);
    }
    if Instant::now() >= limit {
        w.notes.push("kill phase hit its time limit".into());
    }
    let mut m = w.finish(drain(quick)).await?;
    m.insert("kills".into(), kills.into());
    Ok(m)
}

/// Scenario 2: An agent SIGSTOPped (mid-test) for longer than its lease, then SIGCONT.
async fn agent_freeze(ctx: &Ctx, quick: bool) -> anyhow::Result<Map<String, Value>> {
    let agents = ctx.opts.agents.unwrap_or(if quick { 3 } else { 6 });
    let rounds = if quick { 2 } else { 4 };
    let mut s = setup("agent-freeze", agents, LONG);
    // A small backlog: a requeued job is taken again soon, while the frozen agent's test
    // may still run.
    s.backlog = agents;
    let mut w = World::start(ctx, s).await?;
    w.start_submitting();
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let i = victim(&mut w).await;
        w.spawn_probe();
        let t0 = uptime();
        let victims = w.open_runs(i);
        if let Some(p) = &w.agents[i].proc {
            p.signal("STOP")?;
        }
        tokio::time::sleep(beyond_lease()).await;
        if let Some(p) = &w.agents[i].proc {
            p.signal("CONT")?;
        }
        w.fault(format!("SIGSTOP agent {i}"), t0, victims);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.finish(drain(quick)).await
}

/// Scenario 3a: The private RabbitMQ stopped and started, then SIGKILLed and started, under load.
async fn broker_restart(
    ctx: &Ctx,
    quick: bool,
    rabbit: &mut Rabbit,
) -> anyhow::Result<Map<String, Value>> {
    let agents = ctx.opts.agents.unwrap_or(if quick { 3 } else { 6 });
    let rounds = if quick { 1 } else { 2 };
    let mut s = setup("broker-restart", agents, MIXED);
    s.shape.long_pct = 15;
    let mut w = World::start(ctx, s).await?;
    w.start_submitting();
    for _ in 0..rounds {
        for graceful in [true, false] {
            tokio::time::sleep(Duration::from_secs(5)).await;
            w.spawn_probe();
            let t0 = uptime();
            if graceful {
                rabbit.stop().await;
            } else {
                rabbit.kill().await;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            rabbit
                .start()
                .await
                .context("the private RabbitMQ did not come back")?;
            w.fault(
                if graceful {
                    "RabbitMQ stop/start"
                } else {
                    "RabbitMQ SIGKILL/start"
                },
                t0,
                Vec::new(),
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    w.finish(drain(quick)).await
}

/// Scenario 3b: Three private RabbitMQ nodes clustered, quorum job queues, one node SIGKILLed
/// under load and started again. Clients reach the cluster through a proxy that
/// connects to the first live node.
async fn broker_cluster(
    ctx: &Ctx,
    quick: bool,
    sd: &StackDir,
    run_id: &str,
) -> anyhow::Result<Map<String, Value>> {
    let mut nodes = Vec::new();
    for k in 1..=3 {
        nodes.push(Rabbit::new(sd, &format!("tfb{run_id}c{k}"))?);
    }
    let r = cluster_inner(ctx, quick, &mut nodes).await;
    for n in nodes.iter_mut() {
        n.kill().await;
    }
    r
}

async fn cluster_inner(
    ctx: &Ctx,
    quick: bool,
    nodes: &mut [Rabbit],
) -> anyhow::Result<Map<String, Value>> {
    let started = futures_util::future::join_all(nodes.iter_mut().map(|n| n.start())).await;
    for r in started {
        r?;
    }
    let (seed, rest) = nodes.split_first_mut().context("three nodes")?;
    for n in rest.iter() {
        n.join(seed).await?;
    }
    let status = seed.ctl(&["cluster_status"]).await?;
    let proxy = Proxy::start(nodes.iter().map(Rabbit::addr).collect()).await?;
    let uri = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let agents = ctx.opts.agents.unwrap_or(if quick { 3 } else { 6 });
    let mk = |yaml: &str| {
        let mut s = setup("broker-cluster", agents, MIXED);
        s.shape.long_pct = 15;
        s.amqp_uri = Some(uri.clone());
        s.server_env = vec![("TESTFLINGER_QUEUE_TYPE".into(), "quorum".into())];
        s.agent_yaml = yaml.to_string();
        s
    };
    let mut notes = Vec::new();
    let mut w = match World::start(ctx, mk("queue_type: quorum\n")).await {
        Ok(w) => w,
        Err(e) if format!("{e:#}").contains("queue_type") => {
            notes.push(
                "the agent config has no queue_type key: agents run with their default queue type"
                    .to_string(),
            );
            World::start(ctx, mk(""))
                .await
                .context("agents with quorum job queues")?
        }
        Err(e) => return Err(e).context("agents with quorum job queues"),
    };
    w.notes.extend(notes);
    if !status.contains(&nodes[2].node) {
        w.notes
            .push(format!("cluster status lacks a node:\n{status}"));
    }
    w.start_submitting();
    let rounds = if quick { 1 } else { 2 };
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_secs(8)).await;
        w.spawn_probe();
        let t0 = uptime();
        nodes[0].kill().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        nodes[0]
            .start()
            .await
            .context("the killed cluster node did not come back")?;
        w.fault("cluster node SIGKILL/start", t0, Vec::new());
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let m = w.finish(drain(quick)).await;
    drop(proxy);
    m
}

/// Scenario 4: The private Redis restarted: SIGTERM, SIGKILL, and down for longer than a lease.
async fn redis_restart(
    ctx: &Ctx,
    quick: bool,
    stack: &mut Stack,
) -> anyhow::Result<Map<String, Value>> {
    let agents = ctx.opts.agents.unwrap_or(if quick { 3 } else { 6 });
    let rounds = if quick { 1 } else { 2 };
    let mut s = setup("redis-restart", agents, MIXED);
    s.shape.long_pct = 15;
    let mut w = World::start(ctx, s).await?;
    w.start_submitting();
    for _ in 0..rounds {
        for (what, kill, down) in [
            ("Redis SIGTERM/start", false, Duration::ZERO),
            ("Redis SIGKILL/start", true, Duration::ZERO),
            ("Redis down longer than a lease", true, beyond_lease()),
        ] {
            tokio::time::sleep(Duration::from_secs(5)).await;
            w.spawn_probe();
            let t0 = uptime();
            if kill {
                stack.redis.kill().await;
            } else {
                stack.redis.stop().await;
            }
            tokio::time::sleep(down).await;
            stack
                .redis
                .start()
                .await
                .context("the private Redis did not come back")?;
            w.fault(what, t0, Vec::new());
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    w.finish(drain(quick)).await
}

/// Scenario 5: Two API replicas behind a proxy: each SIGKILLed and restarted in turn, then both
/// down at once for longer than a lease (a single-replica API restart).
async fn api_restart(ctx: &Ctx, quick: bool) -> anyhow::Result<Map<String, Value>> {
    let agents = ctx.opts.agents.unwrap_or(if quick { 3 } else { 6 });
    let rounds = if quick { 1 } else { 2 };
    let mut s = setup("api-restart", agents, LONG);
    s.backlog = agents;
    s.replicas = 2;
    let mut w = World::start(ctx, s).await?;
    w.start_submitting();
    for _ in 0..rounds {
        for i in 0..2 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            w.spawn_probe();
            let t0 = uptime();
            if let Some(s) = w.servers[i].take() {
                s.proc.kill().await;
            }
            tokio::time::sleep(Duration::from_secs(LEASE_S + 2)).await;
            w.servers[i] = Some(w.start_server(i).await?);
            w.fault(format!("API replica {i} SIGKILL/start"), t0, Vec::new());
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let t0 = uptime();
    for i in 0..2 {
        if let Some(s) = w.servers[i].take() {
            s.proc.kill().await;
        }
    }
    tokio::time::sleep(beyond_lease()).await;
    for i in 0..2 {
        w.servers[i] = Some(w.start_server(i).await?);
    }
    w.fault("both API replicas down longer than a lease", t0, Vec::new());
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.finish(drain(quick)).await
}

/// Scenario 6: One agent cut from the API (its proxy holds every byte) for longer than its
/// lease, while it runs a test; its RabbitMQ connection stays up.
async fn partition(ctx: &Ctx, quick: bool) -> anyhow::Result<Map<String, Value>> {
    let agents = ctx.opts.agents.unwrap_or(if quick { 3 } else { 6 });
    let rounds = if quick { 2 } else { 4 };
    let mut s = setup("partition", agents, LONG);
    s.backlog = agents;
    s.proxied_agents = (0..agents).collect();
    let mut w = World::start(ctx, s).await?;
    w.start_submitting();
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let i = victim(&mut w).await;
        w.spawn_probe();
        let t0 = uptime();
        let victims = w.open_runs(i);
        if let Some(p) = &w.agents[i].proxy {
            p.pause(true);
        }
        tokio::time::sleep(beyond_lease()).await;
        if let Some(p) = &w.agents[i].proxy {
            p.pause(false);
        }
        w.fault(format!("agent {i} cut from the API"), t0, victims);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.finish(drain(quick)).await
}
