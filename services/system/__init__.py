"""Running the whole system on one machine: a local RabbitMQ node, the four services, the demo."""
