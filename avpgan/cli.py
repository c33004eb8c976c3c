"""The `avpgan` command. Thin: parse argv, load the config, call one function.

Heavy modules are imported inside each command so that `avpgan --help` and `avpgan config show`
answer instantly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from avpgan import __version__, builtin_configs, errors
from avpgan import config as config_mod


def int_at_least(low: int):
    """argparse type: an integer >= `low` (a batch of 0, a retrieval group of fewer than 2 cannot work)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)


def positive_float(text: str) -> float:
    """argparse type: a finite length in seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


CONFIG_HELP = "a built-in config's name (avpgan config list) or a YAML file"
OVERRIDES_HELP = "key.sub=value overrides of the config, e.g. train.gan.steps=100 (avpgan config doc lists every key)"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.file, args.overrides)
    print(config_mod.to_yaml(cfg), end="")
    return 0


def cmd_config_list(args: argparse.Namespace) -> int:
    names = builtin_configs.names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {builtin_configs.description(name)}")
    return 0


def cmd_config_doc(args: argparse.Namespace) -> int:
    from avpgan import config_doc

    print(config_doc.render(), end="")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from avpgan.data import synthvox

    synthvox.generate(
        out=Path(args.out),
        identities=args.identities,
        utterances_per_id=args.utterances_per_id,
        faces_per_id=args.faces_per_id,
        seed=args.seed,
        workers=args.workers,
    )
    return 0


def cmd_shards_build(args: argparse.Namespace) -> int:
    from avpgan.data import shards_build

    cfg = config_mod.load(args.config, args.overrides)
    shards_build.build(
        voxceleb=Path(args.voxceleb),
        vggface=Path(args.vggface),
        meta=Path(args.meta),
        out=Path(args.out),
        data=cfg.data,
        samples_per_shard=args.samples_per_shard or cfg.data.samples_per_shard,
        workers=args.workers,
    )
    return 0


def cmd_shards_check(args: argparse.Namespace) -> int:
    from avpgan.data import shards_check

    return shards_check.check(Path(args.dir))


def cmd_bank_build(args: argparse.Namespace) -> int:
    import torch

    from avpgan.data import bank
    from avpgan.train.stages import weights_path

    cfg = config_mod.load(args.config, args.overrides)
    run_dir = Path(cfg.train.run_dir)
    bank.prepare(cfg, run_dir, weights_path(cfg, run_dir, "voice"), rebuild=True,
                 device="cuda" if torch.cuda.is_available() else "cpu")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from avpgan.train.loop import train

    cfg = config_mod.load(args.config, args.overrides)
    train(cfg, resume=args.resume)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from avpgan import bundle

    counts = bundle.export(Path(args.run), Path(args.out))
    print(f"{args.out}: " + ", ".join(f"{k} ({n} tensors)" for k, n in counts.items()))
    return 0


def cmd_import_voice2face(args: argparse.Namespace) -> int:
    from avpgan.models.convert import convert_file

    kind = convert_file(Path(args.src), Path(args.out), kind=args.kind)
    use = {"voice": f"train the gan stage from it with train.voice_weights={args.out}",
           "generator": "load it with avpgan.models.load_converted"}[kind]
    print(f"{args.out}: Voice2Face {kind} converted; {use}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from avpgan.evaluate import evaluate

    evaluate(Path(args.model), shards=args.shards, split=args.split, seconds=args.seconds, embedder=args.embedder,
             attributes=args.attributes, out=args.out, batch_size=args.batch_size, group_size=args.group_size,
             seed=args.seed)
    _end_process_group()
    return 0


def _end_process_group() -> None:
    """Under `accelerate launch`, close the gloo/NCCL group before the interpreter exits: a group
    left open sometimes aborts a worker at exit ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_generate(args: argparse.Namespace) -> int:
    from avpgan.generate import generate

    report = generate(Path(args.model), args.voices, Path(args.out), seconds=args.seconds,
                      restore=not args.no_restore, grid=args.grid, batch_size=args.batch_size,
                      real=args.real)
    print(f"{len(report.made)} faces from {len(report.made) + len(report.skipped)} voices in "
          f"{report.seconds_total:.2f} s; networks {report.faces_per_s:.1f} faces/s; skipped {len(report.skipped)}"
          + (": " + ", ".join(s["voice"] for s in report.skipped) if report.skipped else ""))
    if not report.made:  # every voice was skipped (each named above); the one line on stderr says so
        only = report.skipped[0]["reason"] if len(report.skipped) == 1 else \
            f"none of the {len(report.skipped)} voices gave a face (each is named above)"
        print(f"avpgan: {errors.one_line(only)}", file=sys.stderr)
        return errors.EXIT_INPUT
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from avpgan.serve import serve

    serve(Path(args.model), host=args.host, port=args.port, seconds=args.seconds, restore=not args.no_restore,
          max_upload_mb=args.max_upload_mb, max_files=args.max_files)
    return 0


class HelpFormatter(argparse.HelpFormatter):
    """Ends every flag's help with its default, or says it is required, so that `--help` alone
    says what a command does when a flag is left out. A flag whose help already names its
    default (one that is None, or comes from the config) is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return text + " (required)"
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with HelpFormatter; subcommands' parsers are of this class too, so they inherit it."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _command(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand whose own --help opens with the line the command list shows for it."""
    return sub.add_parser(name, help=text, description=text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="avpgan", description="Train AVP-GAN voice portraits (voice -> face), evaluate them, "
                                               "and make faces from voices.",
                    epilog="exit codes: 0 done, 1 an input cannot be used or the command stopped, "
                           "2 command line or config error, 3 disk full / read-only / no permission, "
                           "130 interrupted")
    parser.add_argument("--version", action="version", version=f"avpgan {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error (input errors are otherwise one line)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "config", "list, show and document experiment configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    q = _command(csub, "list", "list the built-in configs, each with what it is for")
    q.set_defaults(func=cmd_config_list)
    q = _command(csub, "show", "print the fully resolved config (every key, overrides applied)")
    q.add_argument("file", help=CONFIG_HELP)
    q.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    q.set_defaults(func=cmd_config_show)
    q = _command(csub, "doc", "print the reference of every config key (type, default, valid values, purpose) "
                              "as Markdown")
    q.set_defaults(func=cmd_config_doc)

    p = _command(sub, "synth", "generate the SynthVox voice/face data set")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--identities", type=int, required=True, help="number of speakers, each with a voice and a face")
    p.add_argument("--utterances-per-id", type=int, default=8, help="voice recordings per identity")
    p.add_argument("--faces-per-id", type=int, default=6, help="face pictures per identity")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw: a seed always makes the same data")
    p.add_argument("--workers", type=int, default=2, help="processes writing the files")
    p.set_defaults(func=cmd_synth)

    p = _command(sub, "shards", "build or check WebDataset shards")
    ssub = p.add_subparsers(dest="shards_command", required=True)
    q = _command(ssub, "build", "pack VoxCeleb1-layout voices and VGGFace-layout faces into shards")
    q.add_argument("--voxceleb", required=True, help="folder holding the idNNNNN folders (VoxCeleb1 wav/)")
    q.add_argument("--vggface", required=True, help="folder holding one folder per VGGFace1 name")
    q.add_argument("--meta", required=True, help="vox1_meta.csv (tab-separated)")
    q.add_argument("--out", required=True, help="output folder for {train,val,test}-NNNNNN.tar")
    q.add_argument("--samples-per-shard", type=int, default=0,
                   help="samples per tar file; 0: the config's data.samples_per_shard")
    q.add_argument("--workers", type=int, default=2, help="processes decoding voices and faces")
    q.add_argument("--config", default=None,
                   help=f"{CONFIG_HELP}, whose data and features sections apply (default: the paper's settings, "
                        f"as avpgan.yaml)")
    q.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    q.set_defaults(func=cmd_shards_build)
    q = _command(ssub, "check", "decode every sample and verify the manifest")
    q.add_argument("dir", help="shard folder (the --out of shards build)")
    q.set_defaults(func=cmd_shards_check)

    p = _command(sub, "bank", "the GAN stage's voice-embedding bank")
    bsub = p.add_subparsers(dest="bank_command", required=True)
    q = _command(bsub, "build", "embed every train/val utterance once with the run's frozen voice encoder "
                                "(RUN/bank/); rebuilds a bank that no longer fits the config")
    _add_config_args(q)
    q.set_defaults(func=cmd_bank_build)

    p = _command(sub, "train", "train the configured stages (resumes automatically)")
    _add_config_args(p)
    p.add_argument("--resume", default="auto",
                   help="auto: from the run's newest complete checkpoint, if any; never: start over; "
                        "or a checkpoint directory")
    p.set_defaults(func=cmd_train)

    p = _command(sub, "export", "write a single-file inference bundle (safetensors) from a run")
    p.add_argument("run", help="run directory (train.run_dir)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_export)

    p = _command(sub, "import-voice2face", "convert Voice2Face's voice_embedding.pth or generator.pth to "
                                           "safetensors")
    p.add_argument("src", help="a Voice2Face state dict (.pth)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--kind", choices=("auto", "voice", "generator"), default="auto",
                   help="what the file holds; auto: voice when it has batch-norm statistics, else generator")
    p.set_defaults(func=cmd_import_voice2face)

    p = _command(sub, "evaluate", "face cosine similarity (the paper's eq. 15), retrieval and attribute probes "
                                  "on a shard split")
    p.add_argument("model", help="bundle file (avpgan export) or run directory")
    p.add_argument("--shards", default=None, help="shard folder (default: the model config's data.shards)")
    p.add_argument("--split", default="test", help="shard split whose identities are evaluated: train, val or test")
    p.add_argument("--seconds", type=positive_float, nargs="+", default=[4.0, 8.0],
                   help="voice lengths to evaluate, in seconds")
    p.add_argument("--embedder", default="bundle",
                   help="face embedder that scores the faces: bundle (the run's own ArcFace), dlib, or the PATH "
                        "of an arcface_torch IResNet-50/100 .pth")
    p.add_argument("--attributes", default=None,
                   help="SynthVox attributes.csv: also probe the hidden attributes (default: no probes)")
    p.add_argument("--out", default=None, help="results JSON file (default: results are printed only)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="utterances per batch")
    p.add_argument("--group-size", type=int_at_least(2), default=100,
                   help="identities per retrieval group, the true one included, as in SF2F's protocol")
    p.add_argument("--seed", type=int, default=0, help="seed of the retrieval groups")
    p.set_defaults(func=cmd_evaluate)

    p = _command(sub, "generate", "faces from voice recordings with an exported model")
    p.add_argument("model", help="bundle file (avpgan export) or run directory")
    p.add_argument("voices", nargs="+", help="audio files (wav, flac, ogg, mp3, ...; any rate, mono or stereo)")
    p.add_argument("--out", required=True, help="output folder for the PNG faces")
    p.add_argument("--seconds", type=positive_float, default=None,
                   help="clip length in seconds; a longer file gives the mean over its windows "
                        "(default: the model's training crop)")
    p.add_argument("--no-restore", action="store_true", help="skip the restoration model: write the GAN's faces")
    p.add_argument("--grid", action="store_true", help="also write grid.png with every face")
    p.add_argument("--real", nargs="+", default=None, metavar="IMAGE",
                   help="one picture of each speaker, in the order of the voices: shown above its generated face "
                        "in grid.png (default: none)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="voices per batch")
    p.set_defaults(func=cmd_generate)

    p = _command(sub, "serve", "a local web page that makes faces from uploaded or recorded voices")
    p.add_argument("model", help="bundle file (avpgan export) or run directory; loaded once, at start")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 opens the page to the network (browsers then allow "
                        "recording only over https)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0: any free port (printed at start)")
    p.add_argument("--seconds", type=positive_float, default=None,
                   help="clip length in seconds, as in generate (default: the model's training crop)")
    p.add_argument("--no-restore", action="store_true", help="skip the restoration model: show the GAN's faces only")
    p.add_argument("--max-upload-mb", type=positive_int, default=50, help="largest upload, all files together, in MB")
    p.add_argument("--max-files", type=positive_int, default=32, help="most files in one upload")
    p.set_defaults(func=cmd_serve)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error of the user's input or system becomes `avpgan: <one line>` and
    the exit code of `avpgan.errors` (with `--debug`, its traceback too); a bug raises as usual."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as e:
        known = errors.explain(e)
        if known is None:
            raise
        if args.debug:
            import traceback

            traceback.print_exc()
        code, line = known
        print(f"avpgan: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
