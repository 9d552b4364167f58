"""The eval run config (`posttrain eval FILE`): `stage: eval` and an `eval` section (multiple choice, pairwise
comparison or visual question answering), read from YAML + dotted overrides, typed and validated like a training config.

Every default lives here once, beside its one-line doc (`posttrain keys eval.` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.errors import ConfigError
from posttrain.typed_config import beside, build, opt, read_tree


@dataclass
class MultipleChoiceConfig:
    data: str = opt("", "benchmark folder with dev/ and val/ (or test/) per-subject CSVs, or a .jsonl file")
    split: str = opt("val", "split folder scored: val, test, ...")
    shots_split: str = opt("dev", "split folder the k-shot examples come from")
    shots: int = opt(5, "examples per prompt, 0-5, taken in order from shots_split of the same subject")
    subjects: list[str] = opt([], "subjects to score (empty = all)")
    max_per_subject: int | None = opt(None, "score only the first N questions of each subject (None = all)")
    language: Literal["auto", "zh", "en"] = opt("auto", "prompt wording; auto = zh when questions hold CJK text")
    prompt: Literal["plain", "chat"] = opt(
        "plain", "plain text (works for base and chat models) or wrapped as a user turn of the chat template")
    header: str | None = opt(None, "first line; {subject} is filled in (None: the language's default)")
    answer_cue: str | None = opt(None, "text before the letter, e.g. 'Answer:' (None: the language's default)")
    categories: dict[str, list[str]] = opt({}, "category -> subjects (empty: the built-in map category_map picks)")
    max_length: int = opt(2048, "prompt token limit; shots are dropped from the end until it fits")
    scoring: Literal["letter", "cloze", "calibrated"] = opt(
        "letter", "letter: option-letter log-prob after the cue; cloze: log-prob of each option's text after the "
                  "question (options not listed), per character; calibrated: letter log-prob minus the letter's "
                  "log-prob after a content-free 'N/A' prompt")
    category_map: Literal["auto", "ceval", "mmlu", "cmmlu", "none"] = opt(
        "auto", "built-in subject -> category map; auto: the detected layout's (C-Eval, MMLU, CMMLU), else the one "
                "holding the most subjects")
    shared_prefix: bool = opt(
        True, "score prompts that share a prefix (a subject's header and shots, a question's options) after one "
              "copy of it in packed rows; false: one padded row per prompt or option")


@dataclass
class CompareConfig:
    models: list[str] = opt([], "models to compare (2 or more): run dirs, model folders, built-in names, hub ids")
    prompts: str = opt("", "prompt file: {prompt, reference?, category?, id?} rows, or any SFT layout")
    strict: bool = opt(False, "a prompt row with a content problem (a blank prompt) stops the run instead of being "
                              "dropped and counted (the data policy)")
    judge: str = opt("", "reward-model folder, OpenAI-compatible base URL (http...), or 'reference' "
                         "(ROUGE-L against each prompt's reference answer)")
    judge_model: str = opt("gpt-4o-mini", "model name sent to an LLM judge endpoint")
    judge_max_tokens: int | None = opt(None, "reply length cap sent to an LLM judge (None: the endpoint's own)")
    judge_prompt: str = opt("", "LLM judge prompt with {question}, {answer_a}, {answer_b} (empty: MT-Bench style)")
    epsilon: float = opt(0.0, "tie margin: reward difference (reward model) or ROUGE-L F1 difference (reference)")
    max_new_tokens: int = opt(256, "answer length limit (greedy decoding)")
    rounds: int = opt(200, "bootstrap resamples for the rating intervals")
    seed: int = opt(0, "bootstrap seed")


@dataclass
class VQAConfig:
    data: str = opt("", "VQA file: conversations with images (mllm / sharegpt `images`, OpenAI image_url parts) "
                        "whose last assistant turn is the reference answer")
    max_new_tokens: int = opt(16, "answer length limit (greedy decoding)")
    max_questions: int | None = opt(None, "score only the first N rows (None = all)")
    seed: int = opt(0, "order in which the shuffled-image control hands each distinct image to another question")


@dataclass
class EvalConfig:
    task: Literal["mc", "compare", "vqa"] = opt(
        "mc", "what `posttrain eval CONFIG` runs: mc (multiple-choice benchmark), compare (pairwise, ratings) or "
              "vqa (visual question answering beside a shuffled-image control)")
    model: str = opt("smollm2-135m-instruct", "run dir, model folder, built-in name or hub id to evaluate (mc, vqa)")
    output_dir: str = opt("outputs/eval", "where results JSON, per-item cache and reports go")
    batch_size: int = opt(8, "prompts per forward pass")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to run; auto = cuda when available")
    mc: MultipleChoiceConfig = opt(MultipleChoiceConfig(), "multiple-choice benchmark (C-Eval, CMMLU, MMLU, JSONL)")
    compare: CompareConfig = opt(CompareConfig(), "pairwise comparison of models judged per prompt (task compare)")
    vqa: VQAConfig = opt(VQAConfig(), "visual question answering accuracy, exact match, with its control (task vqa)")


@dataclass
class EvalRunConfig:
    stage: Literal["eval"] = opt("eval", "an eval config says stage: eval (training configs name their stage)")
    eval: EvalConfig = opt(EvalConfig(), "evaluation: a multiple-choice benchmark, a comparison of models, or VQA")


def load_eval_config(path: str | Path | None = None, overrides: list[str] = (), **tree_extra: Any) -> EvalRunConfig:
    """Read an eval YAML (or start from defaults), apply dotted overrides, type-check, validate."""
    tree, base_dir = read_tree(path, overrides, tree_extra)
    if tree.get("stage", "eval") != "eval":
        where = path or "the eval config"
        raise ConfigError(f"{where} is a training config (stage: {tree['stage']}): run it with posttrain train")
    cfg = build(EvalRunConfig, tree)
    mc, cmp = cfg.eval.mc, cfg.eval.compare
    mc.data = beside(mc.data, base_dir)
    cmp.prompts = beside(cmp.prompts, base_dir)
    cmp.models = [beside(m, base_dir) for m in cmp.models]
    cmp.judge = beside(cmp.judge, base_dir)
    cfg.eval.vqa.data = beside(cfg.eval.vqa.data, base_dir)
    validate(cfg.eval)
    return cfg


def validate(ev: EvalConfig) -> None:
    """Cross-field rules of an eval run, all in one place."""
    if ev.batch_size < 1:
        raise ConfigError("eval.batch_size must be >= 1")
    if ev.task == "compare":
        cmp = ev.compare
        if len(cmp.models) < 2 or len(set(cmp.models)) < len(cmp.models):
            raise ConfigError("eval.compare.models needs two or more different models")
        if not cmp.prompts or not cmp.judge:
            raise ConfigError("eval.compare needs prompts (a prompt file) and judge (RM folder, URL or 'reference')")
        short_judge = cmp.judge_max_tokens is not None and cmp.judge_max_tokens < 1
        if cmp.rounds < 1 or cmp.max_new_tokens < 1 or cmp.epsilon < 0 or short_judge:
            raise ConfigError("eval.compare.rounds, max_new_tokens and judge_max_tokens must be >= 1, epsilon >= 0")
        if cmp.judge_max_tokens is not None and not cmp.judge.startswith(("http://", "https://")):
            raise ConfigError("eval.compare.judge_max_tokens applies to an LLM judge only (judge: http...)")
        fields = ("{question}", "{answer_a}", "{answer_b}")
        if cmp.judge_prompt and not all(f in cmp.judge_prompt for f in fields):
            raise ConfigError(f"eval.compare.judge_prompt must contain {', '.join(fields)}")
        return
    if ev.task == "vqa":
        vqa = ev.vqa
        if not vqa.data:
            raise ConfigError("eval.vqa.data is empty: give a file of image questions with reference answers")
        if vqa.max_new_tokens < 1 or (vqa.max_questions is not None and vqa.max_questions < 1):
            raise ConfigError("eval.vqa.max_new_tokens and max_questions must be >= 1")
        return
    if not ev.mc.data:
        raise ConfigError("eval.mc.data is empty: give a benchmark folder (e.g. C-Eval) or a .jsonl file")
    if not 0 <= ev.mc.shots <= 5:
        raise ConfigError("eval.mc.shots must be between 0 and 5")
