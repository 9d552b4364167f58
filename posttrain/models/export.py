"""Export a run as a standalone HF model folder: LoRA merged into the weights, tokenizer and chat
template beside them, loadable by plain `AutoModelForCausalLM.from_pretrained` with no posttrain
or peft installed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.models.anatomy import is_prompt_learning
from posttrain.models.generate import stop_token_ids
from posttrain.models.run import is_peft_model, load_model_for_inference

log = logging.getLogger(__name__)

# Written into every export; its presence is what lets a later export overwrite the folder.
EXPORT_MARKER = "posttrain_export.json"


def export_merged(run_dir: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """Merge the run's adapter (if any) and write config, safetensors, generation config, tokenizer.

    `trust_remote_code` comes from the user's command line only (see models/run.py)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    replace_previous = _check_out_dir(run_dir, out_dir)
    # CPU keeps the merge exact and independent of whatever accelerator trained the run.
    # A QLoRA base is de-quantised first (to the NF4-rounded weights it trained on), then merged.
    model, tokenizer, cfg = load_model_for_inference(str(run_dir), device="cpu", dequantize=True,
                                                     trust_remote_code=trust_remote_code)
    dequantized = cfg is not None and cfg.method.type == "qlora"
    if dequantized:
        log.warning("QLoRA run: the 4-bit base is de-quantised to %s before merging", model.dtype)
    if is_prompt_learning(model):
        raise PosttrainError(
            f"{run_dir}: prompt/prefix tuning adds virtual tokens that cannot be merged into the weights; "
            "use the run folder itself (posttrain chat, or PeftModel.from_pretrained)")
    merged_from_lora = is_peft_model(model)
    if merged_from_lora:
        model = model.merge_and_unload()

    # Generation should stop at the template's end-of-turn token, not only the base model's eos.
    stops = stop_token_ids(model, tokenizer)
    if stops:
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    if replace_previous:  # cleared only now that the run has loaded, so a failure keeps the old export
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "source": str(run_dir.resolve()),
        "base_model": cfg.model.name_or_path if cfg is not None else None,
        "method": cfg.method.type if cfg is not None else None,
        "merged_lora": merged_from_lora,
        "dequantized_4bit_base": dequantized,
    }
    (out_dir / EXPORT_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _check_out_dir(run_dir: Path, out_dir: Path) -> bool:
    """Refuse to mix an export into a folder holding anything else; True for a previous export,
    which is cleared before writing so stale weight shards cannot sit beside the new ones."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PosttrainError(f"export target {out_dir} is a file, not a folder")
    if out_dir.resolve() == run_dir.resolve():
        raise PosttrainError("export target must differ from the run folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return False
    if not (out_dir / EXPORT_MARKER).is_file():
        raise PosttrainError(
            f"export target {out_dir} is not empty and not a previous posttrain export; "
            "choose a new or empty folder")
    return True
