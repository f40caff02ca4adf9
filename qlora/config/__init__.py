"""The one typed config of a job: YAML file + `--set key=value` overrides -> `JobConfig`.

Every section forbids unknown keys, so a typo fails before Ray starts, with the key path and the
allowed names. The config crosses the Ray boundary as JSON (`to_json` / `from_json`) and is validated
again on each worker.
"""
from qlora.config.job import JobConfig
from qlora.config.loading import apply_override, load_config, set_path
from qlora.config.names import flatten, redact_uri, resolve_name_template
from qlora.config.sections import (CLASSIFICATION_FORMATS, GPU_ONLY_OPTIMIZERS, PREFERENCE_FORMATS, DataSection,
                                   EvaluationSection, KFoldSection, LoraSection, ModelSection, PreferenceSection,
                                   QuantizationSection, ScalingSection, Section, TrackingSection, TrainSection)
from qlora.config.validation import validate

__all__ = ["JobConfig", "apply_override", "load_config", "set_path", "flatten", "redact_uri", "resolve_name_template",
           "CLASSIFICATION_FORMATS", "GPU_ONLY_OPTIMIZERS", "PREFERENCE_FORMATS", "DataSection", "EvaluationSection",
           "KFoldSection", "LoraSection", "ModelSection", "PreferenceSection", "QuantizationSection", "ScalingSection",
           "Section", "TrackingSection", "TrainSection", "validate"]
