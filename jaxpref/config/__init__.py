"""The YAML config: `schema` (typed sections), `parse` (YAML, `--set`, types), `validate` (ranges)."""
from jaxpref.config.parse import config_from_dict, dump_config, load_config, to_dict
from jaxpref.config.schema import (Config, DatasetConfig, EarlyStoppingConfig, FinetuningConfig, GpuConfig,
                                   LoggingConfig, LoraConfig, ModelEntry, PostTrainingConfig, TrainingConfig)

__all__ = ["Config", "DatasetConfig", "EarlyStoppingConfig", "FinetuningConfig", "GpuConfig", "LoggingConfig",
           "LoraConfig", "ModelEntry", "PostTrainingConfig", "TrainingConfig", "config_from_dict", "dump_config",
           "load_config", "to_dict"]
