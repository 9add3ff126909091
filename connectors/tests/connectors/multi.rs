//! `multi` against the real API server (RabbitMQ and Redis behind it).
