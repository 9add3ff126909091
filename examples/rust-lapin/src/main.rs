//! Submits a Testflinger job straight to RabbitMQ with lapin and prints the answer.
//!
//! `cargo run -p testflinger-example-lapin -- JOB_QUEUE ["test commands"]`
//! Environment: `AMQP_URI`, `TESTFLINGER_SUBMIT_QUEUE` (default `testflinger.submit`).
//! Exits 1 with the server's error when the job is rejected.

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::time::Duration;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let job_queue = args
        .next()
        .ok_or("usage: testflinger-example-lapin JOB_QUEUE [TEST_CMDS]")?;
    let test_cmds = args
        .next()
        .unwrap_or_else(|| "echo hello from lapin".into());
    let uri = std::env::var("AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let submit_queue =
        std::env::var("TESTFLINGER_SUBMIT_QUEUE").unwrap_or_else(|_| "testflinger.submit".into());

    let conn = Connection::connect(&uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let reply = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut replies = ch
        .basic_consume(
            reply.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

    let job_id = uuid::Uuid::new_v4().to_string();
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let body = serde_json::json!({"job_queue": job_queue, "test_data": {"test_cmds": test_cmds}});
    let confirm = ch
        .basic_publish(
            "".into(),
            submit_queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body.to_string().as_bytes(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(job_id.as_str().into())
                .with_correlation_id(correlation_id.as_str().into())
                .with_reply_to(reply.name().clone()),
        )
        .await?
        .await?;
    if !confirm.is_ack() {
        return Err("the broker did not take the submission".into());
    }
    let answer = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(d)) = replies.next().await {
            if d.properties.correlation_id().as_ref().map(|c| c.as_str())
                == Some(correlation_id.as_str())
            {
                return serde_json::from_slice::<serde_json::Value>(&d.data).ok();
            }
        }
        None
    })
    .await
    .map_err(|_| "no answer within 30 s (is an API server consuming the submit queue?)")?
    .ok_or("the reply queue closed")?;
    match answer.get("job_id").and_then(|v| v.as_str()) {
        Some(id) => {
            println!("job_id: {id}");
            Ok(())
        }
        None => Err(format!(
            "rejected: {}",
            answer["error"].as_str().unwrap_or("unknown error")
        )
        .into()),
    }
}
