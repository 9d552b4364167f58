"""The data sections: training and evaluation files (`data.datasets`), lengths, packing and masking.

Every default lives here once, beside its one-line doc (`posttrain keys` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.typed_config import opt


@dataclass
class DatasetConfig:
    path: str = opt("", "a .json/.jsonl/.csv/.parquet file (relative paths: to the config file)")
    format: Literal["auto", "alpaca", "sharegpt", "openai", "text"] = opt(
        "auto", "row layout; auto-detected from the columns when 'auto'")
    weight: float = opt(1.0, "mixing weight: the dataset contributes round(weight * rows) samples (seeded)")
    max_samples: int | None = opt(None, "cap on rows taken from this file (after shuffling), None = all")
    columns: dict[str, str] = opt({}, "rename columns: {our_name: file_column}, e.g. {output: answer}")
    role_tags: dict[str, str] = opt({}, "sharegpt 'from' values -> roles, added to human/gpt/system/...")


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = opt([], "training datasets, mixed by weight / max_samples")
    eval_datasets: list[DatasetConfig] = opt([], "explicit evaluation sets (else val_size holds out)")
    val_size: float = opt(0.0, "held-out share of training rows: <1 a fraction, >=1 a count")
    max_length: int = opt(1024, "max tokens per sample; oldest turns go first, then the sample")
    packing: bool | Literal["auto"] = opt(
        False, "pack samples into max_length rows (attention never crosses samples); auto = pack on stage sft "
        "unless the method cannot (prompt/prefix tuning)")
    mask: Literal["all", "last", "full"] = opt(
        "all", "loss on: every assistant turn, the last assistant turn, or the whole sequence")
    variables: dict[str, str] = opt({}, "values for {{placeholders}} in the data, e.g. {name: Aria}")
    strict: bool = opt(False, "content problems in a row (empty response, chosen == rejected, too long) are fatal "
                              "instead of dropped and counted by reason; structural problems are always fatal")
