"""`videoqa`: index a video once, then answer questions from its compressed cache (embedded mode: no
Redis or Celery needed); or `videoqa serve` the whole service (API, a worker, Redis) on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.engine.config import SamplingConfig, default_cache_dir
from worker.tools.shapes import SHAPES, reduced

MODES = ("cached", "question_guided", "focused", "uncompressed")


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _mmss(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def _compression_config(args: argparse.Namespace):
    """The defaults, then what the checkpoint carries (`videoqa.json`), then the flags given."""
    from worker.engine.adaretake import CompressionConfig
    from worker.engine.checkpoint_settings import read_checkpoint_settings, with_settings

    config = with_settings(CompressionConfig(), read_checkpoint_settings(args.model))
    sampling = {"fps": args.fps, "max_frames": args.max_frames, "long_side": args.long_side}
    flags = {
        "budget": args.budget,
        "chunk_frames": args.chunk_frames,
        "layer_allocation": args.layer_allocation,
        "temporal_allocation": args.temporal_allocation,
    }
    given = {name: value for name, value in flags.items() if value is not None}
    given["sampling"] = {name: value for name, value in sampling.items() if value is not None}
    return with_settings(config, given)


def _load(args: argparse.Namespace):
    from worker.engine.models import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    _say(f"model: {loaded.name} ({loaded.family}, {loaded.revision}) on {loaded.device}")
    return loaded


def _index(loaded, args: argparse.Namespace):
    """The video's artifact from the cache directory, compressing it first on a miss."""
    from tqdm import tqdm

    from worker.engine.engine import get_or_compress
    from worker.engine.storage import DiskStore

    store = DiskStore(args.cache_dir, device=loaded.device)
    with tqdm(total=100, desc="indexing", unit="%", file=sys.stderr, leave=False) as bar:

        def progress(stage: str, fraction: float) -> None:
            bar.set_postfix_str(stage)
            bar.update(round(fraction * 100) - bar.n)

        result = get_or_compress(loaded, store, args.video, _compression_config(args), on_progress=progress)
    report = result.artifact.metadata["report"]
    if result.hit:
        _say(
            f"cache hit: {result.key.to_string()} ({result.nbytes / 1e6:.1f} MB, loaded in "
            f"{result.seconds['load']:.2f}s)"
        )
    else:
        features = (store.features_nbytes(result.key) or 0) / 1e6
        _say(
            f"cache miss ({result.reason}): compressed and stored {result.key.to_string()} "
            f"(+ {features:.1f} MB of vision features for question-guided answers)"
        )
    per_layer = report["video_tokens_after_per_layer"]
    _say(
        f"{report['frames']} frames, video tokens {report['video_tokens_before']} -> "
        f"{report['video_tokens_after']:.0f} per layer on average "
        f"(min {min(per_layer)}, max {max(per_layer)}; "
        f"ratio {report['global_ratio']:.3f}), artifact {result.nbytes / 1e6:.1f} MB"
    )
    return result


def _cmd_index(args: argparse.Namespace) -> int:
    result = _index(_load(args), args)
    seconds = result.seconds
    print("timings: " + " | ".join(f"{stage} {value:.2f}s" for stage, value in seconds.items()))
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from worker.engine.decode import VideoDecodeError

    try:
        if args.mode == "uncompressed":
            return _ask_uncompressed(_load(args), args)
        return _ask_compressed(_load(args), args)
    except (VideoDecodeError, FileNotFoundError) as error:
        _say(f"videoqa: {error}")
        return 2


def _print_text(text: str) -> None:
    print(text, end="", flush=True)


def _focus_config(args: argparse.Namespace):
    from worker.engine.focus import FocusConfig

    given = {"moments": args.focus_moments, "window": args.focus_window, "fps": args.focus_fps,
             "long_side": args.focus_long_side}  # fmt: skip
    return FocusConfig(**{name: value for name, value in given.items() if value is not None})


def _ask_compressed(loaded, args: argparse.Namespace) -> int:
    from worker.engine.engine import answer_from_artifact, compress_for_question
    from worker.engine.focus import answer_focused
    from worker.engine.storage import DiskStore

    if args.mode == "question_guided":  # compressed for this question, from the index's vision features
        store = DiskStore(args.cache_dir, device=loaded.device)
        artifact, reused = compress_for_question(
            loaded, store, args.video, args.question, _compression_config(args)
        )
        video_seconds = artifact.metadata["report"]["seconds"]
        source = "the indexed video's vision features" if reused else "the video (not indexed: decoded again)"
        _say(f"question-guided: compressed with the question as the guide prompt from {source} (not cached)")
    else:
        result = _index(loaded, args)
        artifact = result.artifact
        video_seconds = {} if result.hit else result.seconds

    def ask(artifact, max_new_tokens: int):
        return answer_from_artifact(
            loaded, artifact, args.question, max_new_tokens=max_new_tokens, on_text=_print_text
        )

    if args.mode == "focused":
        config = _compression_config(args)
        answer = answer_focused(loaded, artifact, args.video, ask, config=_focus_config(args),
                                sampling=config.sampling, max_new_tokens=args.max_new_tokens)  # fmt: skip
    else:
        answer = ask(artifact, args.max_new_tokens)
    print()
    moments = ", ".join(f"{_mmss(t)} ({share:.0%})" for t, share in answer.top_moments)
    print(f"evidence: {moments}")
    if answer.focus is not None:
        windows = ", ".join(f"{_mmss(start)}-{_mmss(end)}" for start, end in answer.focus["windows"])
        width, height = answer.focus["frame_size"]
        print(f"re-read: {windows} ({answer.focus['frames']} frames at {answer.focus['fps']:g} fps, "
              f"{width}x{height}; {answer.focus['decoded_frames']} decoded)")  # fmt: skip
    print(
        # Milliseconds: with a tiny model a stage that ran can take under 5 ms.
        f"timings: decode {video_seconds.get('decode', 0):.3f}s"
        f" | vision {video_seconds.get('vision', 0):.3f}s"
        f" | video prefill {video_seconds.get('prefill', 0):.3f}s | question prefill "
        f"{answer.timings['prefill']:.2f}s | decode-tokens {answer.timings['generate']:.2f}s "
        f"({len(answer.token_ids)} tokens) | mode {args.mode}"
    )
    return 0


def _ask_uncompressed(loaded, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from worker.engine.answer import answer_uncompressed
    from worker.engine.decode import probe

    sampling = _compression_config(args).sampling
    info = probe(args.video, sampling)
    _say(
        f"{Path(args.video).name}: {info.duration:.1f}s {info.width}x{info.height} -> "
        f"{info.num_samples} frames at {info.out_width}x{info.out_height}"
    )
    with tqdm(total=info.num_samples, unit="frame", desc="decode+encode", file=sys.stderr) as bar:
        answer = answer_uncompressed(
            loaded,
            args.video,
            args.question,
            sampling=sampling,
            max_new_tokens=args.max_new_tokens,
            info=info,
            on_frames=bar.update,
            on_text=_print_text,
        )
    print()
    t = answer.timings
    print(
        f"timings: decode {t['decode']:.2f}s | vision {t['vision']:.2f}s | prefill {t['prefill']:.2f}s | "
        f"decode-tokens {t['generate']:.2f}s ({len(answer.token_ids)} tokens) | "
        f"{answer.num_frames} frames, {answer.num_video_tokens} video tokens | mode uncompressed"
    )
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from worker.tools.tiny import make_shaped, make_tiny

    if args.shape == "tiny":
        if args.layers is not None or args.vision_blocks is not None:
            raise ValueError("--layers and --vision-blocks apply to a real shape (--shape 7b, 72b, qwen2-7b)")
        for family, path in make_tiny(args.dir).items():
            print(f"{family}: {path}")
        return 0
    shape = reduced(SHAPES[args.shape], args.layers, args.vision_blocks)
    path = make_shaped(args.dir / args.shape, shape)
    print(f"{args.shape}: {path} ({shape.model_id} widths, {shape.num_layers} layers, "
          f"{shape.vision_depth} vision blocks, random bf16 weights)")  # fmt: skip
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from service.contract import Settings
    from worker.tools.plan import Workload, peak_phase, plan, shape_from_config, sizing_table

    fields = Settings.model_fields  # the default cache tiers
    tiers = fields["memory_cache_bytes"].default, fields["disk_cache_bytes"].default
    if args.table:
        print(sizing_table([SHAPES["7b"], SHAPES["72b"]], *tiers))
        return 0
    shape = shape_from_config(args.model) if args.model else SHAPES[args.shape]
    shape = reduced(shape, args.layers)
    work = Workload(
        duration=args.duration,
        width=args.width,
        height=args.height,
        sampling=SamplingConfig(fps=args.fps, max_frames=args.max_frames, long_side=args.long_side),
        budget=args.budget,
        chunk_frames=args.chunk_frames,
        temporal_allocation=args.temporal_allocation,
    )
    p = plan(shape, work)
    gib, mb = 1024**3, 1e6
    print(f"{shape.model_id} ({shape.family}, {shape.num_layers} layers), {args.duration:.0f} s of "
          f"{args.width}x{args.height} video")  # fmt: skip
    print(f"frames {p.frames} at {p.frame_size[0]}x{p.frame_size[1]}, video tokens {p.video_tokens}, "
          f"{p.chunk_tokens} per chunk, {p.kept_tokens} kept per layer (text0 included)")  # fmt: skip
    print(f"weights          {p.weights / gib:8.2f} GiB ({p.weights_per_layer / gib:.3f} GiB per layer)")
    print(f"KV per token     {p.kv_bytes_per_token:8d} bytes, all layers")
    print(f"vision phase     {p.vision_peak / gib:8.2f} GiB besides the weights "
          f"(and {p.host_features / gib:.2f} GiB of host memory for the video's features)")  # fmt: skip
    print(f"prefill phase    {p.prefill_peak / gib:8.2f} GiB (cache {p.prefill_cache / gib:.2f}, "
          f"activations {p.prefill_activations / gib:.2f})")  # fmt: skip
    print(f"answer phase     {p.answer_peak / gib:8.2f} GiB")
    print(f"peak memory      {p.peak / gib:8.2f} GiB ({peak_phase(p)})")
    print(f"artifact         {p.artifact_bytes / mb:8.1f} MB: {tiers[0] // p.artifact_bytes} fit the default "
          f"memory tier, {tiers[1] // p.artifact_bytes} the disk tier")  # fmt: skip
    flops = p.flops
    print(f"compute          vision {flops['vision'] / 1e12:.1f} TFLOP, "
          f"prefill {flops['prefill'] / 1e12:.1f} "
          f"TFLOP, {flops['decode_token'] / 1e9:.1f} GFLOP per answer token")  # fmt: skip
    return 0


def _cmd_make_needle(args: argparse.Namespace) -> int:
    from worker.needle.videos import colour_question, random_spec, write_video

    spec = random_spec(args.seed, args.seconds, "eval", depth=args.depth, distractors=0)
    write_video(spec, args.out)
    needle, qa = spec.target, colour_question(spec)
    _say(f"{args.out}: a {needle.colour} {needle.shape} from {needle.start:.1f}s to "
         f"{needle.start + needle.duration:.1f}s of {spec.seconds:g}s")  # fmt: skip
    print(f"{qa.question}\t{qa.answer}")
    return 0


def _cmd_train_needle(args: argparse.Namespace) -> int:
    from worker.needle.train import TrainConfig, binding_config, evaluate, save_trained, train

    steps = {} if args.steps is None else {"steps": args.steps}
    if args.stage == "binding":
        if args.init is None:
            raise SystemExit("--stage binding needs --init: the needle stage's checkpoint folder")
        config = binding_config(args.family, str(args.init), seed=args.seed, **steps)
    else:
        config = TrainConfig(family=args.family, seed=args.seed, **steps)
    result = train(config, log=_say, workers=args.workers)
    _say(f"trained in {result.seconds:.0f}s; evaluating on {args.eval_videos} held-out videos per length")
    accuracy = evaluate(result.loaded, config, args.eval_videos)
    for length, value in accuracy.items():
        print(f"colour accuracy, uncompressed, {length}: {value:.1%}")
    record = {"colour_accuracy": accuracy, "eval_videos": args.eval_videos}
    folder = save_trained(result, config, args.dir / args.family, record)
    print(f"{config.family}: {folder}")
    return 0


def _cmd_calibrate_evidence(args: argparse.Namespace) -> int:
    from worker.engine.checkpoint_settings import write_evidence
    from worker.needle.calibrate import CalibrationConfig, calibrate
    from worker.needle.videos import FRAME_SIZE
    from worker.tools.plan import Workload, plan, shape_from_config

    calibration = CalibrationConfig(videos=args.videos, seed=args.seed, shares=tuple(args.shares))
    config = _compression_config(args)
    work = Workload(duration=calibration.seconds, width=FRAME_SIZE, height=FRAME_SIZE,
                    sampling=config.sampling, chunk_frames=config.chunk_frames)  # fmt: skip
    flops = plan(shape_from_config(args.model), work).flops
    total = calibration.videos * (flops["vision"] + len(calibration.shares) * flops["prefill"])
    _say(f"{calibration.videos} needle videos x {len(calibration.shares)} budgets: about {total / 1e12:.1f} "
         "TFLOP (vision and prefill, by videoqa plan's model)")  # fmt: skip
    loaded = _load(args)
    result = calibrate(loaded, config, calibration, on_video=lambda done: _say(f"video {done}/{args.videos}"))
    heads = (
        ", ".join(f"{layer}.{head}" for layer, head in result.heads)
        or "every head (no smaller set did better)"
    )
    print(f"heads (layer.head): {heads}")
    for name, value in result.grounded.items():
        print(f"top moment within 1 s of the needle, {name}: {value:.1%}")
    if args.dry_run:
        return 0
    print(f"written to {write_evidence(args.model, result.settings())}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from worker.tools.serve import serve

    return serve(args.host, args.port, args.model, args.data_dir, workers=args.workers)


def _add_engine_arguments(parser: argparse.ArgumentParser, video: bool = True) -> None:
    from worker.engine.adaretake import LAYER_ALLOCATIONS, TEMPORAL_ALLOCATIONS, CompressionConfig
    from worker.engine.models import DEFAULT_MODEL_ID

    if video:
        parser.add_argument("video", help="path to a video file")
    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="checkpoint path or model id (%(default)s)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)"
    )
    parser.add_argument(
        "--dtype", default="auto", help="float32, bfloat16 ... (default: bf16 on GPU, fp32 on CPU)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="where compressed caches are kept (VIDEOQA_CACHE_DIR; default %(default)s)",
    )
    defaults = CompressionConfig()
    # None = not given: the checkpoint's videoqa.json, if any, then these defaults apply.
    carried = "; a checkpoint's videoqa.json may set another default"
    parser.add_argument(
        "--fps", type=float, help=f"frames sampled per second ({defaults.sampling.fps:g}{carried})"
    )
    parser.add_argument("--max-frames", type=int, help=f"frame cap ({defaults.sampling.max_frames}{carried})")
    parser.add_argument(
        "--long-side", type=int, help=f"longest frame side in pixels ({defaults.sampling.long_side}{carried})"
    )
    parser.add_argument("--budget", type=int, help=f"context budget in tokens ({defaults.budget}{carried})")
    parser.add_argument(
        "--chunk-frames", type=int, help=f"frames per prefill chunk ({defaults.chunk_frames})"
    )
    parser.add_argument(
        "--layer-allocation", choices=LAYER_ALLOCATIONS, help=f"({defaults.layer_allocation})"
    )
    parser.add_argument(
        "--temporal-allocation", choices=TEMPORAL_ALLOCATIONS, help=f"({defaults.temporal_allocation})"
    )


def build_parser(engine_commands: bool = True) -> argparse.ArgumentParser:
    """The `videoqa` parser. `engine_commands=False` leaves out index and ask, whose defaults come from the
    engine's modules: `serve` only supervises processes and should not pay for importing torch."""
    parser = argparse.ArgumentParser(prog="videoqa", description="Long-video question answering.")
    commands = parser.add_subparsers(dest="command", required=True)
    if engine_commands:
        _add_engine_commands(commands)

    tiny = commands.add_parser(
        "make-tiny",
        help="build random checkpoints: tiny Qwen2.5-VL and Qwen2-VL ones, or a real shape at reduced depth",
        description="Without --shape: tiny random Qwen2.5-VL and Qwen2-VL checkpoints in DIR/qwen2_5_vl and "
        "DIR/qwen2_vl (seconds). With --shape: one checkpoint in DIR/SHAPE with the real widths of "
        "Qwen2.5-VL-7B (7b), Qwen2.5-VL-72B (72b) or Qwen2-VL-7B (qwen2-7b), its real 152K vocabulary, "
        "random bf16 weights and as few layers as --layers says (7b at 2 layers: about 3.4 GB).",
    )
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--shape", choices=("tiny", *SHAPES), default="tiny")
    tiny.add_argument("--layers", type=int, help="LLM layers of a real shape (default: all of them)")
    tiny.add_argument(
        "--vision-blocks", type=int, help="vision blocks of a real shape (default: all of them)"
    )
    tiny.set_defaults(run=_cmd_make_tiny)

    make_needle = commands.add_parser(
        "make-needle",
        help="write a needle video (held-out footage, one shape); prints its colour question and answer",
    )
    make_needle.add_argument("out", type=Path, help="the MP4 to write")
    make_needle.add_argument("--seconds", type=float, default=32.0)
    make_needle.add_argument("--seed", type=int, default=0)
    make_needle.add_argument("--depth", type=float, help="where the needle sits, 0 (start) to 1 (end)")
    make_needle.set_defaults(run=_cmd_make_needle)

    needle = commands.add_parser(
        "train-needle",
        help="train a small checkpoint on the synthetic needle task (CPU; ~20 minutes a stage)",
    )
    needle.add_argument("dir", type=Path, help="the checkpoint goes to DIR/FAMILY")
    needle.add_argument("--family", choices=("qwen2_5_vl", "qwen2_vl"), default="qwen2_5_vl")
    needle.add_argument("--seed", type=int, default=0)
    needle.add_argument("--steps", type=int, help="optimizer steps (default: the committed checkpoints')")
    needle.add_argument("--eval-videos", type=int, default=100, help="held-out videos per length")
    needle.add_argument(
        "--stage",
        choices=("needle", "binding"),
        default="needle",
        help="needle: from scratch; binding: from --init, learns which colour belongs to which shape",
    )
    needle.add_argument("--init", type=Path, help="the needle stage's checkpoint folder (--stage binding)")
    needle.add_argument(
        "--workers", type=int, default=4, help="processes computing gradients (the weights are the same)"
    )
    needle.set_defaults(run=_cmd_train_needle)

    serve = commands.add_parser(
        "serve",
        help="run the service here: the API, workers and (without VIDEOQA_REDIS_URL) a redis-server",
        description="Run the HTTP API (uvicorn) and Celery workers, plus a redis-server on a free port "
        "when VIDEOQA_REDIS_URL is not set. Other settings come from VIDEOQA_* variables (VIDEOQA_DEVICE, "
        "VIDEOQA_PRESET, VIDEOQA_API_KEYS, ...). Ctrl-C or SIGTERM stops everything.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface for the API (%(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port for the API (%(default)s)")
    serve.add_argument(
        "--model", help="checkpoint path or model id (default: VIDEOQA_MODEL, else Qwen2.5-VL-7B)"
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        help="uploads, artifacts and Redis data (default: VIDEOQA_DATA_DIR, else ./data)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes, each with its own model (%(default)s); on a GPU host, one per GPU",
    )
    serve.set_defaults(run=_cmd_serve)
    return parser


def _add_engine_commands(commands) -> None:
    from worker.engine.adaretake import TEMPORAL_ALLOCATIONS
    from worker.engine.focus import FocusConfig
    from worker.needle.calibrate import CalibrationConfig
    from worker.tools.plan import Workload

    planner = commands.add_parser(
        "plan",
        help="predict the memory, artifact size and compute of indexing a video (no model needed)",
        description="Predict peak accelerator memory (weights + the largest of the vision, prefill and "
        "answer phases), the artifact's bytes and the FLOPs of indexing a video, for a model's shape "
        "(--shape, or the config.json of --model). --table prints the README's sizing table.",
    )
    defaults = Workload(duration=0)
    planner.add_argument("--shape", choices=tuple(SHAPES), default="7b")
    planner.add_argument("--model", type=Path, help="a local checkpoint folder: its config.json's shape")
    planner.add_argument("--layers", type=int, help="LLM layers (default: the model's)")
    planner.add_argument("--duration", type=float, default=600.0, help="seconds of video (%(default)s)")
    planner.add_argument("--width", type=int, default=defaults.width, help="the video's (%(default)s)")
    planner.add_argument("--height", type=int, default=defaults.height, help="the video's (%(default)s)")
    planner.add_argument("--fps", type=float, default=defaults.sampling.fps)
    planner.add_argument("--max-frames", type=int, default=defaults.sampling.max_frames)
    planner.add_argument("--long-side", type=int, default=defaults.sampling.long_side)
    planner.add_argument("--budget", type=int, default=defaults.budget, help="context budget in tokens")
    planner.add_argument("--chunk-frames", type=int, default=defaults.chunk_frames)
    planner.add_argument(
        "--temporal-allocation", choices=TEMPORAL_ALLOCATIONS, default=defaults.temporal_allocation
    )
    planner.add_argument("--table", action="store_true", help="the sizing table for 7B and 72B")
    planner.set_defaults(run=_cmd_plan)

    index = commands.add_parser("index", help="compress a video into the cache (once per video and settings)")
    _add_engine_arguments(index)
    index.set_defaults(run=_cmd_index)

    ask = commands.add_parser("ask", help="answer a question about a video, reusing its cached compression")
    _add_engine_arguments(ask)
    ask.add_argument("question")
    ask.add_argument(
        "--mode",
        choices=MODES,
        default="cached",
        help="cached: generic guide prompt, compressed once and reused (default); question_guided: "
        "compressed with the question as the guide; focused: from the cache, then again after re-reading "
        "the video around the top evidence moments; uncompressed: every video token",
    )
    ask.add_argument("--max-new-tokens", type=int, default=128)
    focus = FocusConfig()
    ask.add_argument("--focus-moments", type=int, help=f"focused: moments re-read ({focus.moments})")
    ask.add_argument("--focus-window", type=float, help=f"focused: seconds around each ({focus.window:g})")
    ask.add_argument("--focus-fps", type=float, help=f"focused: frames per second re-read ({focus.fps:g})")
    ask.add_argument(
        "--focus-long-side", type=int, help="focused: longest side of a re-read frame (default: --long-side)"
    )
    ask.set_defaults(run=_cmd_ask)

    calibrate = commands.add_parser(
        "calibrate-evidence",
        help="choose the attention heads that point at the asked moment (once per checkpoint)",
        description="Runs generated needle videos through the model at each budget, ranks every (layer, "
        "head) by how often its top frame is the needle's, and writes the best set into the checkpoint's "
        "videoqa.json, which the CLI and the worker then use for every answer's evidence.",
    )
    _add_engine_arguments(calibrate, video=False)
    calibrate.add_argument("--videos", type=int, default=CalibrationConfig().videos)
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--shares", type=float, nargs="+", default=list(CalibrationConfig().shares),
                           help="video-token budgets to calibrate at (1.0: uncompressed)")  # fmt: skip
    calibrate.add_argument("--dry-run", action="store_true", help="print the choice, write nothing")
    calibrate.set_defaults(run=_cmd_calibrate_evidence)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(engine_commands=argv[:1] != ["serve"]).parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # bad settings, unsupported checkpoints: a message, not a traceback
        _say(f"videoqa: {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
