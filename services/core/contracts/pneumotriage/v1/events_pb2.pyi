import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Answer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANSWER_UNSPECIFIED: _ClassVar[Answer]
    ANSWER_PNEUMONIA: _ClassVar[Answer]
    ANSWER_HEALTHY: _ClassVar[Answer]
    ANSWER_CANT_TELL: _ClassVar[Answer]

class Confidence(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONFIDENCE_UNSPECIFIED: _ClassVar[Confidence]
    CONFIDENCE_SURE: _ClassVar[Confidence]
    CONFIDENCE_PROBABLY: _ClassVar[Confidence]

class Flag(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLAG_UNSPECIFIED: _ClassVar[Flag]
    FLAG_URGENT: _ClassVar[Flag]
    FLAG_PNEUMONIA_SUSPECTED: _ClassVar[Flag]
    FLAG_UNCERTAIN: _ClassVar[Flag]
    FLAG_LIKELY_HEALTHY: _ClassVar[Flag]
    FLAG_NOT_TRIAGED: _ClassVar[Flag]
ANSWER_UNSPECIFIED: Answer
ANSWER_PNEUMONIA: Answer
ANSWER_HEALTHY: Answer
ANSWER_CANT_TELL: Answer
CONFIDENCE_UNSPECIFIED: Confidence
CONFIDENCE_SURE: Confidence
CONFIDENCE_PROBABLY: Confidence
FLAG_UNSPECIFIED: Flag
FLAG_URGENT: Flag
FLAG_PNEUMONIA_SUSPECTED: Flag
FLAG_UNCERTAIN: Flag
FLAG_LIKELY_HEALTHY: Flag
FLAG_NOT_TRIAGED: Flag

class ImageRef(_message.Message):
    __slots__ = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "sop_class_uid", "storage_uri", "sha256", "lane")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_CLASS_UID_FIELD_NUMBER: _ClassVar[int]
    STORAGE_URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    storage_uri: str
    sha256: str
    lane: str
    def __init__(self, study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ..., sop_class_uid: _Optional[str] = ..., storage_uri: _Optional[str] = ..., sha256: _Optional[str] = ..., lane: _Optional[str] = ...) -> None: ...

class ImageReceived(_message.Message):
    __slots__ = ("image", "modality", "body_part_examined", "view_position", "transfer_syntax_uid", "rows", "columns", "photometric_interpretation", "patient_age_years", "triage_eligible", "outside_intended_use", "intended_use_note", "calling_ae_title", "received_at", "study_image_count", "not_triaged_reason", "lane_reason")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    BODY_PART_EXAMINED_FIELD_NUMBER: _ClassVar[int]
    VIEW_POSITION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SYNTAX_UID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    PHOTOMETRIC_INTERPRETATION_FIELD_NUMBER: _ClassVar[int]
    PATIENT_AGE_YEARS_FIELD_NUMBER: _ClassVar[int]
    TRIAGE_ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    OUTSIDE_INTENDED_USE_FIELD_NUMBER: _ClassVar[int]
    INTENDED_USE_NOTE_FIELD_NUMBER: _ClassVar[int]
    CALLING_AE_TITLE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    STUDY_IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    NOT_TRIAGED_REASON_FIELD_NUMBER: _ClassVar[int]
    LANE_REASON_FIELD_NUMBER: _ClassVar[int]
    image: ImageRef
    modality: str
    body_part_examined: str
    view_position: str
    transfer_syntax_uid: str
    rows: int
    columns: int
    photometric_interpretation: str
    patient_age_years: int
    triage_eligible: bool
    outside_intended_use: bool
    intended_use_note: str
    calling_ae_title: str
    received_at: _timestamp_pb2.Timestamp
    study_image_count: int
    not_triaged_reason: str
    lane_reason: str
    def __init__(self, image: _Optional[_Union[ImageRef, _Mapping]] = ..., modality: _Optional[str] = ..., body_part_examined: _Optional[str] = ..., view_position: _Optional[str] = ..., transfer_syntax_uid: _Optional[str] = ..., rows: _Optional[int] = ..., columns: _Optional[int] = ..., photometric_interpretation: _Optional[str] = ..., patient_age_years: _Optional[int] = ..., triage_eligible: _Optional[bool] = ..., outside_intended_use: _Optional[bool] = ..., intended_use_note: _Optional[str] = ..., calling_ae_title: _Optional[str] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., study_image_count: _Optional[int] = ..., not_triaged_reason: _Optional[str] = ..., lane_reason: _Optional[str] = ...) -> None: ...

class ImageRejected(_message.Message):
    __slots__ = ("image", "reason_code", "reason", "dicom_status", "stored", "calling_ae_title", "received_at")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DICOM_STATUS_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    CALLING_AE_TITLE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    image: ImageRef
    reason_code: str
    reason: str
    dicom_status: int
    stored: bool
    calling_ae_title: str
    received_at: _timestamp_pb2.Timestamp
    def __init__(self, image: _Optional[_Union[ImageRef, _Mapping]] = ..., reason_code: _Optional[str] = ..., reason: _Optional[str] = ..., dicom_status: _Optional[int] = ..., stored: _Optional[bool] = ..., calling_ae_title: _Optional[str] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("image", "probability", "logit", "model_name", "model_version", "runtime", "latency_ms", "heatmap_uri", "predicted_at", "received_at", "gate_verdict", "gate_reason", "gate_score", "gate_version", "rescore_of_model_version", "rescore_reason", "rescore_request_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_URI_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_AT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    GATE_VERDICT_FIELD_NUMBER: _ClassVar[int]
    GATE_REASON_FIELD_NUMBER: _ClassVar[int]
    GATE_SCORE_FIELD_NUMBER: _ClassVar[int]
    GATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESCORE_OF_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESCORE_REASON_FIELD_NUMBER: _ClassVar[int]
    RESCORE_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image: ImageRef
    probability: float
    logit: float
    model_name: str
    model_version: str
    runtime: str
    latency_ms: float
    heatmap_uri: str
    predicted_at: _timestamp_pb2.Timestamp
    received_at: _timestamp_pb2.Timestamp
    gate_verdict: str
    gate_reason: str
    gate_score: float
    gate_version: str
    rescore_of_model_version: str
    rescore_reason: str
    rescore_request_id: str
    def __init__(self, image: _Optional[_Union[ImageRef, _Mapping]] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., runtime: _Optional[str] = ..., latency_ms: _Optional[float] = ..., heatmap_uri: _Optional[str] = ..., predicted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gate_verdict: _Optional[str] = ..., gate_reason: _Optional[str] = ..., gate_score: _Optional[float] = ..., gate_version: _Optional[str] = ..., rescore_of_model_version: _Optional[str] = ..., rescore_reason: _Optional[str] = ..., rescore_request_id: _Optional[str] = ...) -> None: ...

class RescoreRequested(_message.Message):
    __slots__ = ("image", "withdrawn_model_version", "reason", "request_id", "requested_at", "received_at")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    image: ImageRef
    withdrawn_model_version: str
    reason: str
    request_id: str
    requested_at: _timestamp_pb2.Timestamp
    received_at: _timestamp_pb2.Timestamp
    def __init__(self, image: _Optional[_Union[ImageRef, _Mapping]] = ..., withdrawn_model_version: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ..., requested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Judgment(_message.Message):
    __slots__ = ("image", "judgment_id", "task_id", "annotator_id", "answer", "confidence", "cant_tell_reason", "annotator_trust", "is_gold", "has_click", "click_x", "click_y", "seconds_spent", "submitted_at", "job_version")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    JUDGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    CANT_TELL_REASON_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_TRUST_FIELD_NUMBER: _ClassVar[int]
    IS_GOLD_FIELD_NUMBER: _ClassVar[int]
    HAS_CLICK_FIELD_NUMBER: _ClassVar[int]
    CLICK_X_FIELD_NUMBER: _ClassVar[int]
    CLICK_Y_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SPENT_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    JOB_VERSION_FIELD_NUMBER: _ClassVar[int]
    image: ImageRef
    judgment_id: str
    task_id: str
    annotator_id: str
    answer: Answer
    confidence: Confidence
    cant_tell_reason: str
    annotator_trust: float
    is_gold: bool
    has_click: bool
    click_x: float
    click_y: float
    seconds_spent: float
    submitted_at: _timestamp_pb2.Timestamp
    job_version: str
    def __init__(self, image: _Optional[_Union[ImageRef, _Mapping]] = ..., judgment_id: _Optional[str] = ..., task_id: _Optional[str] = ..., annotator_id: _Optional[str] = ..., answer: _Optional[_Union[Answer, str]] = ..., confidence: _Optional[_Union[Confidence, str]] = ..., cant_tell_reason: _Optional[str] = ..., annotator_trust: _Optional[float] = ..., is_gold: _Optional[bool] = ..., has_click: _Optional[bool] = ..., click_x: _Optional[float] = ..., click_y: _Optional[float] = ..., seconds_spent: _Optional[float] = ..., submitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., job_version: _Optional[str] = ...) -> None: ...

class LabelAggregate(_message.Message):
    __slots__ = ("image", "p_pneumonia", "final_label", "confidence", "judgments", "complete", "method", "revision", "updated_at")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    P_PNEUMONIA_FIELD_NUMBER: _ClassVar[int]
    FINAL_LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    JUDGMENTS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    image: ImageRef
    p_pneumonia: float
    final_label: Answer
    confidence: float
    judgments: int
    complete: bool
    method: str
    revision: int
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, image: _Optional[_Union[ImageRef, _Mapping]] = ..., p_pneumonia: _Optional[float] = ..., final_label: _Optional[_Union[Answer, str]] = ..., confidence: _Optional[float] = ..., judgments: _Optional[int] = ..., complete: _Optional[bool] = ..., method: _Optional[str] = ..., revision: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TriageUpdated(_message.Message):
    __slots__ = ("study_instance_uid", "flag", "previous_flag", "p_pneumonia", "reason", "revision", "model_version", "human_judgments", "updated_at", "sop_instance_uids")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FLAG_FIELD_NUMBER: _ClassVar[int]
    P_PNEUMONIA_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HUMAN_JUDGMENTS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UIDS_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    flag: Flag
    previous_flag: Flag
    p_pneumonia: float
    reason: str
    revision: int
    model_version: str
    human_judgments: int
    updated_at: _timestamp_pb2.Timestamp
    sop_instance_uids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, study_instance_uid: _Optional[str] = ..., flag: _Optional[_Union[Flag, str]] = ..., previous_flag: _Optional[_Union[Flag, str]] = ..., p_pneumonia: _Optional[float] = ..., reason: _Optional[str] = ..., revision: _Optional[int] = ..., model_version: _Optional[str] = ..., human_judgments: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sop_instance_uids: _Optional[_Iterable[str]] = ...) -> None: ...
