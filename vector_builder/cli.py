"""``lm-eval-steer build``: build steering vectors and choose their layers and strengths.

    lm-eval-steer build --model_args pretrained=DIR,gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=float32 \
        --instructions format --out fmt.safetensors --report build/
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import replace
from typing import Any

from lm_eval_steer.core.console import fail
from lm_eval_steer.runtime.compatibility import ModelShape
from lm_eval_steer.runtime.modelargs import ModelArgError, check_local_model, config_before_loading
from vector_builder import prompts
from vector_builder.methods import METHODS
from vector_builder.methods.learned import LearnedSettings
from vector_builder.methods.learned.targets import TargetSettings
from vector_builder.pipeline import BuildResult, Validation, build, check_outputs
from vector_builder.runner import GenerationSettings
from vector_builder.search import OBJECTIVES, WITH_INSTRUCTION_TOO, WITHOUT_INSTRUCTION, CandidateResult, SearchSettings, window_words
from vector_builder.settings import BuildSettings

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "auto": "auto"}


def _int_list(value: str) -> list[int]:
    return [int(item) for item in value.split(",") if item.strip()]


def _float_list(value: str) -> list[float]:
    numbers = [float(item) for item in value.split(",") if item.strip()]
    if not numbers or not all(math.isfinite(number) for number in numbers):
        raise argparse.ArgumentTypeError(f"{value!r}: expected finite numbers separated by commas")
    return numbers


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_args", required=True, help="pretrained=NAME_OR_DIR[,gguf_file=F][,dtype=float32][,device=cpu][,name=MODEL_NAME]")
    parser.add_argument("--search_model_args", default=None, help="choose layers/strengths on another model of the same shape (e.g. the base model)")
    parser.add_argument("--instructions", required=True, help="comma-separated groups (format, length, keywords) and/or IFEval instruction ids")
    parser.add_argument("--keywords", default=None, help="words for the keywords group: word1,word2 or a file with one word per line")
    parser.add_argument("--keyword-sample", type=int, default=None, metavar="N",
                        help="keywords: choose one layer/strength per keyword instruction on N sampled words pooled, for every word "
                        "(default: search each word on its own)")
    parser.add_argument("--queries", default=None, help="JSONL of {'query': ...} questions, or a packaged set's name: queries (the default, 293 questions) or writing_tasks (120 writing requests)")
    parser.add_argument("--out", required=True, help="vector file to write (.safetensors)")
    parser.add_argument("--report", default="build", help="directory for report.json, scores.png and the checkpoint")
    parser.add_argument("--layers", type=_int_list, default=None, help="candidate layers, e.g. 6,10,14 (default: from n_layers/5 in steps of 2)")
    parser.add_argument("--multipliers", type=_float_list, default=[0.5, 1.0, 1.5],
                        help="strength multipliers (default 0.5,1,1.5; m=1 is the paper's strength in project mode; 2 made SmolLM2 repeat itself)")
    parser.add_argument("--strength-base", choices=["shift", "paper"], default="shift",
                        help="shift: project s = b + m*|d|, add s = m*|d|; paper: s = m*c (see vector_builder.search.strength_of)")
    parser.add_argument("--n-train", type=int, default=64, help="training pairs per instruction")
    parser.add_argument("--n-val", type=int, default=8, help="validation prompts per instruction")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-repetition", type=float, default=0.5, help="degeneracy guard: 1 - distinct 4-gram ratio above which an output is degenerate")
    parser.add_argument("--allowed-degenerate", type=int, default=0, help="answers a candidate may have that loop where the unsteered answer to the same prompt does not (default 0)")
    parser.add_argument(
        "--min-length-ratio",
        type=float,
        default=0.5,
        help="length guard: disqualify a candidate whose mean answer length is below this fraction of the unsteered mean "
        "(default 0.5; 0 turns it off; never applied to length instructions or constrained_response, whose answer may be one phrase)",
    )
    parser.add_argument("--objective", choices=OBJECTIVES, default="follows",
                        help="the validation score each choice maximises: follows = share of answers the checker passes (default); "
                        "fluent = share it passes that do not loop either. --resume chooses again under another objective without generating")
    parser.add_argument("--val-with-instruction", action="store_true",
                        help="also validate on the prompts with the instruction shown (doubles validation; guards the instructed setting)")
    parser.add_argument("--steer-first-token", action="store_true", help="also steer each row's first token (the attention sink); off by default")
    parser.add_argument("--stop-after-keyword", action=argparse.BooleanOptionalAction, default=True,
                        help="keyword-inclusion entries stop steering an answer once it contains the word (their stop_after; default on)")
    parser.add_argument("--stop-after-first-token", action=argparse.BooleanOptionalAction, default=True,
                        help="token-method inclusion entries also stop once the first token of a longer word is written, the only piece "
                        "their push can write (default on)")
    parser.add_argument("--stop-once-followed", action=argparse.BooleanOptionalAction, default=True,
                        help="title and constrained-response entries stop steering an answer once it holds what their checker asks "
                        "for (a '>>' closing the title; 'My answer is yes./no./maybe.'), since nothing after it can fail the instruction (default on)")
    parser.add_argument("--stop-after-tokens", type=_int_list, default=[], metavar="N,N,...",
                        help="also try every candidate steering only the first N answer tokens (its stop_after_tokens), e.g. 32,64; "
                        "chosen on validation with layer and strength; each N must be below --max-new-tokens (default: not searched)")
    parser.add_argument("--start-after-tokens", type=_int_list, default=[], metavar="K,K,...",
                        help="also try every candidate starting only after the answer's first K tokens were written unsteered (its start_after_tokens), "
                        "e.g. 4,16; chosen on validation with layer and strength; each K must be below --max-new-tokens (default: not searched)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted build from the checkpoint in --report; also re-chooses a finished "
        "build under other --allowed-degenerate / --min-length-ratio values without generating again")
    method = parser.add_argument_group(
        "build method",
        "diffmean: the paper's difference of means; learned: a vector trained on responses that follow the instruction, with the "
        "model frozen; token (keyword instructions only): the word's output-embedding row, no training; both (default): search "
        "diffmean and learned on the same validation prompts and keep the better per instruction",
    )
    method.add_argument("--method", choices=list(METHODS), default="both")
    method.add_argument("--learned-layers", type=_int_list, default=None, help="layers to train learned vectors at (default: about n_layers/5)")
    method.add_argument("--learned-multipliers", type=_float_list, default=[1.0], help="strength multipliers of learned vectors (default 1: the trained vector)")
    method.add_argument("--learned-steps", type=int, default=40, help="maximum Adam steps per vector (early stopping on held-out loss; default 40)")
    method.add_argument("--learned-lr", type=float, default=0.08, help="Adam learning rate (default 0.08)")
    method.add_argument("--learned-batch-size", type=int, default=4, help="training examples per step (default 4)")
    method.add_argument("--learned-l2", type=float, default=0.0, help="L2 penalty on the vector (default 0)")
    method.add_argument(
        "--learned-fluency",
        type=float,
        default=0.0,
        metavar="MU",
        help="weight of the fluency term: KL from the unsteered model's next-token distribution at the target tokens it would have "
        "written itself (e.g. 1; default 0: off). Costs one unsteered forward pass per training batch",
    )
    method.add_argument(
        "--learned-joint",
        action="store_true",
        help="train the vectors at all --learned-layers together as one set (each candidate steers with the whole set, one entry per layer; "
        "entries past the first are named <name>@L<layer>). Default: one vector per layer, each validated alone",
    )
    method.add_argument("--target-samples", type=int, default=4, help="sampled answers per training query whose greedy answer fails the checker (default 4)")
    method.add_argument("--target-max-tokens", type=int, default=128, help="length limit of the generated training targets (default 128)")
    method.add_argument("--target-max-repetition", type=float, default=None, metavar="R",
                        help="refuse training targets that loop: token 4-gram repetition above R, the guard's measure (e.g. 0.5; default: looping targets allowed)")
    method.add_argument("--token-multipliers", type=_float_list, default=[0.1, 0.2, 0.3],
                        help="token method: strengths as fractions of the residual stream's norm at the layer (default 0.1,0.2,0.3)")


def _parsed_model_args(model_args: str) -> dict[str, Any]:
    from lm_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(model_args)
    if "pretrained" not in args:
        raise ModelArgError("--model_args needs pretrained=...")
    check_local_model(args["pretrained"], "--model_args")
    return args


def shape_before_loading(model_args: str) -> ModelShape | None:
    """The model's shape (hidden size, decoder layers; named by ``name=`` or ``pretrained=``), read
    from its config (for a GGUF file, only its metadata) before any weights load, so that options and
    vector files that do not fit fail in seconds; None when the config cannot be read here (they are
    then checked on the loaded model)."""
    args = _parsed_model_args(model_args)
    config = config_before_loading(str(args["pretrained"]), args)
    return ModelShape.of_config(config, str(args.get("name", args["pretrained"]))) if config is not None else None


def load_model(model_args: str) -> tuple[Any, Any, str]:
    """``(model, tokenizer, name)`` from harness-style ``key=value,...`` model args."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = _parsed_model_args(model_args)
    pretrained = str(args["pretrained"])
    gguf = {"gguf_file": str(args["gguf_file"])} if args.get("gguf_file") else {}
    if gguf and os.path.isdir(pretrained) and not os.path.isfile(os.path.join(pretrained, gguf["gguf_file"])):
        raise ModelArgError(f"--model_args: gguf_file={gguf['gguf_file']!r}: no such file in {pretrained}")
    dtype_name = DTYPES.get(str(args.get("dtype", "float32")))
    if dtype_name is None:
        raise ModelArgError(f"--model_args dtype={args['dtype']!r}: expected one of {', '.join(DTYPES)}")
    dtype = dtype_name if dtype_name == "auto" else getattr(torch, dtype_name)
    device = str(args.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(pretrained, **gguf)
    model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=dtype, **gguf).to(device).eval()
    return model, tokenizer, str(args.get("name", pretrained))


def settings_from(args: argparse.Namespace) -> BuildSettings:
    """The one place command-line options become build settings; the model names are filled in once
    the models have loaded."""
    search = SearchSettings(
        layers=tuple(args.layers or ()),
        multipliers=tuple(args.multipliers),
        token_multipliers=tuple(args.token_multipliers),
        strength_base=args.strength_base,
        validation_prompts=WITH_INSTRUCTION_TOO if args.val_with_instruction else WITHOUT_INSTRUCTION,
        keyword_sample=args.keyword_sample,
        max_repetition=args.max_repetition,
        allowed_degenerate=args.allowed_degenerate,
        min_length_ratio=args.min_length_ratio,
        stop_after_keyword=args.stop_after_keyword,
        stop_after_first_token=args.stop_after_first_token,
        stop_after_tokens=tuple(args.stop_after_tokens),
        start_after_tokens=tuple(args.start_after_tokens),
        objective=args.objective,
        stop_once_followed=args.stop_once_followed,
    )
    learned = LearnedSettings(
        layers=tuple(args.learned_layers or ()),
        multipliers=tuple(args.learned_multipliers),
        steps=args.learned_steps,
        lr=args.learned_lr,
        batch_size=args.learned_batch_size,
        l2=args.learned_l2,
        fluency=args.learned_fluency,
        joint=args.learned_joint,
    )
    return BuildSettings(
        model="",
        instructions=tuple(item.strip() for item in args.instructions.split(",") if item.strip()),
        keywords=tuple(prompts.parse_keywords(args.keywords)),
        n_train=args.n_train,
        n_val=args.n_val,
        method=args.method,
        generation=GenerationSettings(batch_size=args.batch_size, seed=args.seed, max_new_tokens=args.max_new_tokens, skip_first_token=not args.steer_first_token),
        search=search,
        learned=learned,
        targets=TargetSettings(samples=args.target_samples, max_tokens=args.target_max_tokens, max_repetition=args.target_max_repetition),
    )


def _scores(item: CandidateResult) -> str:
    return f"val {item.score:.2f} (fluent {item.fluent_score:.2f})"


def print_summary(result: BuildResult) -> None:
    """Per target: the unsteered validation score and what was chosen."""
    for instruction_id, words in result.pooled.items():
        print(f"{instruction_id}: one choice pooled over {len(words)} sampled words, applied to every word (each at its own strength)")
    for name, outcome in result.results.items():
        chosen = outcome.candidate(outcome.chosen) if outcome.chosen else None
        strength = f"strength {chosen.strength:.3g}" if chosen is not None and chosen.strength is not None else f"multiplier {chosen.multiplier:g}" if chosen else ""
        window = "" if chosen is None else window_words(chosen.start_after_tokens, chosen.stop_after_tokens)
        where = "" if chosen is None else f"layers {'+'.join(map(str, chosen.joint_layers))} (joint)" if chosen.joint_layers else f"layer {chosen.layer}"
        summary = "no steering (left out)" if chosen is None else f"{where}, {strength}{window}, {_scores(chosen)}"
        print(f"{name:55s} unsteered {_scores(outcome.candidates[0])} -> {summary}")
    kept = {name: method for name, method in result.methods.items() if method is not None}
    if kept:
        print("kept: " + ", ".join(f"{name} ({method})" for name, method in kept.items()))
    print(f"report: {result.report_path}\nplot:   {result.plot_path}")
    if result.training_plot_path is not None:
        print(f"training curves: {result.training_plot_path}")


def run(args: argparse.Namespace) -> int:
    try:
        check_outputs(args.out, args.report)
        settings = settings_from(args)  # bad options fail here, not after minutes of model loading
        shape = shape_before_loading(args.model_args)
        if shape is not None and shape.num_layers is not None:
            settings.layers_for(shape.num_layers)  # refuses layers outside the model before the weights load
        model, tokenizer, name = load_model(args.model_args)
        search_model, _, search_name = load_model(args.search_model_args) if args.search_model_args else (None, None, "")
        result = build(
            model,
            tokenizer,
            replace(settings, model=name, search_model=search_name),
            out=args.out,
            report_dir=args.report,
            queries=prompts.load_queries(args.queries) if args.queries else None,
            resume=args.resume,
            validation=Validation(model=search_model),
        )
    except (ValueError, OSError) as error:
        return fail("build", error)
    print_summary(result)
    if result.vector_file is None:
        print("no entry beat 'no steering' on validation: no vector file written")
        return 1
    print(f"vectors: {args.out} ({len(result.vector_file.entries)} entries)")
    return 0
