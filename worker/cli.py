"""`videoqa`: the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.config import SamplingConfig


def _ask(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from worker.answer import answer_uncompressed
    from worker.decode import VideoDecodeError, probe
    from worker.models import load_model

    sampling = SamplingConfig(fps=args.fps, max_frames=args.max_frames, long_side=args.long_side)
    try:
        info = probe(args.video, sampling)
    except VideoDecodeError as error:
        print(f"videoqa: {error}", file=sys.stderr)
        return 2
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    print(
        f"{Path(args.video).name}: {info.duration:.1f}s {info.width}x{info.height} -> "
        f"{info.num_samples} frames at {info.out_width}x{info.out_height} | "
        f"{loaded.family} on {loaded.device}",
        file=sys.stderr,
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
            on_text=lambda text: print(text, end="", flush=True),
        )
    print()
    t = answer.timings
    print(
        f"timings: decode {t['decode']:.2f}s | vision {t['vision']:.2f}s | prefill {t['prefill']:.2f}s | "
        f"decode-tokens {t['generate']:.2f}s ({len(answer.token_ids)} tokens) | "
        f"{answer.num_frames} frames, {answer.num_video_tokens} video tokens"
    )
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from worker.tiny import make_tiny

    for family, path in make_tiny(args.dir).items():
        print(f"{family}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from worker.models import DEFAULT_MODEL_ID

    parser = argparse.ArgumentParser(prog="videoqa", description="Long-video question answering.")
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser("ask", help="answer a question about a video")
    ask.add_argument("video", help="path to a video file")
    ask.add_argument("question")
    ask.add_argument(
        "--model", default=DEFAULT_MODEL_ID, help="checkpoint path or model id (default: %(default)s)"
    )
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument("--fps", type=float, default=SamplingConfig.fps)
    ask.add_argument("--max-frames", type=int, default=SamplingConfig.max_frames)
    ask.add_argument("--long-side", type=int, default=SamplingConfig.long_side)
    ask.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ask.add_argument(
        "--dtype", default="auto", help="float32, bfloat16 ... (default: bf16 on GPU, fp32 on CPU)"
    )
    ask.set_defaults(run=_ask)

    tiny = commands.add_parser("make-tiny", help="build tiny random Qwen2.5-VL and Qwen2-VL checkpoints")
    tiny.add_argument("dir", type=Path)
    tiny.set_defaults(run=_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
