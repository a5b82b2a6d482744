"""Settings of the whole-system commands (`./pt up`, `demo`), env prefix PT_SYSTEM_."""

from __future__ import annotations

from pathlib import Path

from services.core.settings import CommonSettings


class SystemSettings(CommonSettings):
    # AMQP port of the local RabbitMQ node that `up` starts when PT_AMQP_URL is not given
    # (a free port is used when this one is taken).
    system_amqp_port: int = 5672
    # RabbitMQ management UI port (0 = no management plugin).
    system_management_port: int = 15672
    # Where the local node keeps its data; default <data_dir>/rabbitmq (kept between runs).
    system_rabbit_dir: Path | None = None
    # Seconds to wait for every service's /healthz before giving up.
    system_health_timeout_s: float = 180.0
    # Restart back-off of a crashed service: first delay and cap, seconds.
    system_restart_backoff_s: float = 1.0
    system_restart_backoff_max_s: float = 30.0

    def amqp_url_given(self) -> bool:
        return "amqp_url" in self.model_fields_set
