#!/usr/bin/env python3
"""Submit a Testflinger job straight to RabbitMQ with pika, and wait for the answer.

Usage: publish_pika.py JOB_QUEUE [TEST_CMDS]

Environment: AMQP_URI (default amqp://guest:guest@127.0.0.1:5672/%2f),
TESTFLINGER_SUBMIT_QUEUE (default testflinger.submit),
TESTFLINGER_EVENTS_WAIT=1 to also wait for the job's `complete` event.

Prints `job_id: <id>` on success; exits 1 with the server's error otherwise.
"""
import json
import os
import sys
import uuid

import pika

uri = os.environ.get("AMQP_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")
submit_queue = os.environ.get("TESTFLINGER_SUBMIT_QUEUE", "testflinger.submit")
if len(sys.argv) < 2:
    sys.exit(__doc__)
job_queue = sys.argv[1]
test_cmds = sys.argv[2] if len(sys.argv) > 2 else "echo hello from pika"

conn = pika.BlockingConnection(pika.URLParameters(uri))
ch = conn.channel()
ch.confirm_delivery()

# A private queue for the answer.
reply_queue = ch.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue

# Optionally watch the job's events (topic exchange, routing key job.<queue>.<state>).
events_queue = None
if os.environ.get("TESTFLINGER_EVENTS_WAIT") == "1":
    events_queue = ch.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    ch.queue_bind(events_queue, "testflinger.events", routing_key=f"job.{job_queue}.*")

job_id = str(uuid.uuid4())  # message_id = job id: redelivery or a retry creates no duplicate
correlation_id = str(uuid.uuid4())
job = {"job_queue": job_queue, "test_data": {"test_cmds": test_cmds}}
ch.basic_publish(
    exchange="",
    routing_key=submit_queue,
    body=json.dumps(job),
    properties=pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        message_id=job_id,
        correlation_id=correlation_id,
        reply_to=reply_queue,
    ),
    mandatory=True,
)

answer = None
for method, props, body in ch.consume(reply_queue, auto_ack=True, inactivity_timeout=30):
    if method is None:
        sys.exit("no answer from Testflinger within 30 s (is an API server consuming the submit queue?)")
    if props.correlation_id == correlation_id:
        answer = json.loads(body)
        break
ch.cancel()

if "error" in answer:
    print(f"rejected: {answer['error']}", file=sys.stderr)
    sys.exit(1)
print(f"job_id: {answer['job_id']}")

if events_queue:
    for method, props, body in ch.consume(events_queue, auto_ack=True, inactivity_timeout=120):
        if method is None:
            sys.exit("the job did not complete within 120 s")
        event = json.loads(body)
        if event["job_id"] != answer["job_id"]:
            continue
        print(f"event: {event['job_state']}")
        if event["job_state"] in ("complete", "cancelled"):
            break
conn.close()
