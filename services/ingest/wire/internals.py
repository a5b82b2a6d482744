"""What the fast path touches inside pynetdicom, checked once at start-up: when any of it is gone
(a pynetdicom upgrade moved it), ingest serves on pynetdicom's own path and says so in its log."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# (module, dotted attribute) the fast path reads, replaces or calls; the instance attributes of
# DULServiceProvider / Association / DIMSEServiceProvider are checked on objects pynetdicom builds.
MODULE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("pynetdicom.dul", "DULServiceProvider._read_pdu_data"),
    ("pynetdicom.dul", "DULServiceProvider._decode_pdu"),
    ("pynetdicom.dul", "time"),
    ("pynetdicom.association", "time"),
    ("pynetdicom.transport", "ThreadedAssociationServer.get_request"),
    ("pynetdicom.transport", "ThreadedAssociationServer.verify_request"),
    ("pynetdicom.transport", "ThreadedAssociationServer.server_bind"),
    ("pynetdicom.transport", "ThreadedAssociationServer.server_activate"),
    ("pynetdicom.service_class", "StorageServiceClass.validate_status"),
)
DUL_ATTRIBUTES = ("event_queue", "_recv_pdu", "to_user_queue", "to_provider_queue", "state_machine", "socket")
ASSOCIATION_ATTRIBUTES = ("dul", "dimse", "accepted_contexts", "requestor", "is_established")
DIMSE_ATTRIBUTES = ("msg_queue", "maximum_pdu_size", "send_msg")


def missing_internals() -> list[str]:
    """What the fast path needs that this pynetdicom lacks (empty: the fast path may run)."""
    import importlib

    missing: list[str] = []
    for module_name, dotted in MODULE_ATTRIBUTES:
        try:
            obj: object = importlib.import_module(module_name)
            for part in dotted.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{dotted}")
    try:
        from pynetdicom import AE
        from pynetdicom.association import Association

        assoc = Association(AE(), "acceptor")
        for name in ASSOCIATION_ATTRIBUTES:
            if not hasattr(assoc, name):
                missing.append(f"Association.{name}")
        for name in DUL_ATTRIBUTES:
            if not hasattr(assoc.dul, name):
                missing.append(f"DULServiceProvider.{name}")
        if not hasattr(getattr(assoc.dul, "state_machine", None), "current_state"):
            missing.append("StateMachine.current_state")
        for name in DIMSE_ATTRIBUTES:
            if not hasattr(assoc.dimse, name):
                missing.append(f"DIMSEServiceProvider.{name}")
    except Exception as exc:  # building an association failed: the fast path cannot be trusted
        missing.append(f"Association(): {type(exc).__name__}")
    return missing


def fast_path_usable(wanted: bool) -> bool:
    """`wanted` (PT_INGEST_FAST_PATH), unless pynetdicom lacks what the fast path needs."""
    if not wanted:
        return False
    missing = missing_internals()
    if missing:
        log.warning(
            "pynetdicom lacks what the C-STORE fast path needs: serving on pynetdicom's own path",
            extra={"missing": missing},
        )
        return False
    return True
