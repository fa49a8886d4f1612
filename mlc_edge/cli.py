"""The ``mlc-edge`` command line.

Its commands::

    mlc-edge compile MODEL_DIR --target cpu -o BUNDLE   # config + weights + library
    mlc-edge gen-config / convert MODEL_DIR -o BUNDLE    # one part at a time
    mlc-edge compile BUNDLE --target cpu                 # the library of a bundle
    mlc-edge run BUNDLE "prompt"
    mlc-edge memory BUNDLE_or_config.json --compare      # GPU memory, MLC's load check
    mlc-edge verify BUNDLE_or_config.json                # OpenCL kernels vs. the CPU
    mlc-edge package BUNDLE... -o DIST                   # the Android app (APK)
    mlc-edge push DIST                                   # install it, push the weights
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .bundle import layout
from .errors import UserError

QUANT_HELP = (
    "weight scheme: q0f16t (fp16 [in, out], default), q0f32t, q0f16, q4f16t, "
    "q4f16t-g128, q4f32t (4-bit linear weights and output layer; cpu, "
    "android-opencl, cuda), q4f16t-hf, q4f16t-g128-hf, q4f32t-hf (the output "
    "layer kept in floats)"
)


def _size_options(func: Any) -> Any:
    options = [
        click.option("--preset", default=None, help="runtime sizes: edge-512 or edge-768"),
        click.option(
            "--context-window-size",
            type=int,
            default=None,
            help="tokens the KV cache holds (overrides the preset)",
        ),
        click.option(
            "--prefill-chunk-size",
            type=int,
            default=None,
            help="tokens per prefill step (overrides the preset)",
        ),
        click.option(
            "--max-batch-size",
            type=int,
            default=None,
            help="sequences at once (overrides the preset)",
        ),
        click.option("--quantization", default="q0f16t", show_default=True, help=QUANT_HELP),
    ]
    for option in reversed(options):
        func = option(func)
    return func


NON_FINITE_HELP = "convert weights holding NaN or Inf (a warning instead of an error)"
TARGET_HELP = (
    "the target the bundle is for: a device's largest allocation splits the "
    "embedding/output layer (give the same to gen-config, convert and compile)"
)


@contextlib.contextmanager
def _gguf_as_folder(path: Path, config_only: bool) -> Iterator[Path]:
    """A ``.gguf`` (or a folder holding one) as a Hugging Face-style folder (only its
    config.json when ``config_only``), for as long as the command runs; any other path as
    it is."""
    from .checkpoint.gguf_file import find_gguf, prepare_config_dir, prepare_model_dir

    gguf_path = find_gguf(path)
    if gguf_path is None:
        yield path
        return
    prepare = prepare_config_dir if config_only else prepare_model_dir
    with tempfile.TemporaryDirectory(prefix="mlc-edge-gguf-") as tmp:
        # Named after the file: the default library name comes from the folder's name.
        folder = Path(tmp) / gguf_path.stem
        folder.mkdir()
        yield prepare(gguf_path, folder)


def _model_folder(model_dir: Path) -> Path:
    """``model_dir``, or the folder made from its GGUF, kept until the command ends."""
    return click.get_current_context().with_resource(_gguf_as_folder(model_dir, False))


def _config_folder(path: Path) -> Path:
    """``path``, or a folder with the config.json of its GGUF (memory, verify: they read
    only the config), kept until the command ends."""
    return click.get_current_context().with_resource(_gguf_as_folder(path, True))


def _spec(
    model_dir: Path,
    quantization: str,
    preset: str | None,
    target: str | None,
    sizes: dict[str, int | None],
):
    from .bundle.steps import resolve_spec
    from .compiler.targets import get_target

    default = get_target(target).default_preset if target else "edge-512"
    spec = resolve_spec(model_dir, quantization, preset or default, sizes)
    # The weights are converted as this target's library takes them (split to fit it).
    return _for_target(spec, target)


def _for_target(spec: Any, target: str | None) -> Any:
    if target is None:
        return spec
    from .compiler.build import spec_for_target
    from .compiler.targets import get_target

    return spec_for_target(spec, get_target(target))


def _emit(as_json: bool, payload: dict[str, Any], lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(payload))
    else:
        for line in lines:
            click.echo(line)


@click.group()
@click.version_option(package_name="mlc-edge")
def cli() -> None:
    """Compile Hugging Face LLM checkpoints into MLC-LLM bundles for phone GPUs."""


@cli.command("gen-config")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--conv-template", default=None, help="conversation template (default: detected)")
@click.option("--target", default=None, help=TARGET_HELP)
@_size_options
def gen_config_cmd(
    model_dir: Path,
    output: Path,
    conv_template: str | None,
    target: str | None,
    preset: str | None,
    quantization: str,
    **sizes: int | None,
) -> None:
    """Write mlc-chat-config.json and the tokenizer files."""
    from .bundle.output import staged
    from .bundle.steps import write_chat_config

    model_dir = _model_folder(model_dir)
    spec = _spec(model_dir, quantization, preset, target, sizes)
    with staged(output) as stage:
        write_chat_config(model_dir, spec, stage, conv_template)
    click.echo(f"wrote {output / layout.CHAT_CONFIG}")


@cli.command("convert")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--quantization", default="q0f16t", show_default=True, help=QUANT_HELP)
@click.option("--target", default=None, help=TARGET_HELP)
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
@click.option("--allow-non-finite", is_flag=True, help=NON_FINITE_HELP)
def convert_cmd(
    model_dir: Path,
    output: Path,
    quantization: str,
    target: str | None,
    as_json: bool,
    allow_non_finite: bool,
) -> None:
    """Convert the weights into tensor-cache.json + params_shard_*.bin."""
    from .bundle.output import staged
    from .bundle.steps import weight_bytes, write_weights

    model_dir = _model_folder(model_dir)
    spec = _spec(model_dir, quantization, None, target, {})
    with staged(output, needs_bytes=weight_bytes(spec)) as stage:
        cache = write_weights(
            model_dir, spec, stage, progress=not as_json, allow_non_finite=allow_non_finite
        )
    meta = cache["metadata"]
    _emit(
        as_json,
        {"output": str(output), "shards": len(cache["records"]), **meta},
        [
            f"wrote {meta['ParamSize']:,} parameters ({meta['ParamBytes'] / 2**20:.1f} MiB) in "
            f"{len(cache['records'])} shards to {output}"
        ],
    )


@cli.command("compile")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--target", default="cpu", show_default=True, help="see `mlc-edge targets`")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="bundle folder (default: MODEL_DIR when it is a bundle)",
)
@click.option("--conv-template", default=None, help="conversation template (default: detected)")
@click.option("--model-lib", default=None, help="library name (symbol prefix on Android)")
@click.option(
    "--model-url",
    default=None,
    help="phone: where the app downloads the weights (default: a placeholder, "
    "for weights pushed with `mlc-edge push`)",
)
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
@click.option("--allow-non-finite", is_flag=True, help=NON_FINITE_HELP)
@_size_options
def compile_cmd(
    model_dir: Path,
    target: str,
    output: Path | None,
    conv_template: str | None,
    model_lib: str | None,
    model_url: str | None,
    as_json: bool,
    allow_non_finite: bool,
    preset: str | None,
    quantization: str,
    **sizes: int | None,
) -> None:
    """Compile MODEL_DIR into a bundle (config + weights + library).

    Given a bundle (a folder with mlc-chat-config.json), compile only its library.
    """
    from .bundle.output import staged
    from .bundle.steps import (
        default_model_lib,
        require_weights_match,
        weight_bytes,
        write_chat_config,
        write_library,
        write_weights,
    )
    from .compiler.targets import get_target
    from .config import ModelSpec

    target_spec = get_target(target)
    target_spec.require_buildable()  # before reading or writing anything
    if model_lib is not None and not re.fullmatch(r"[0-9A-Za-z_]+", model_lib):
        raise UserError(
            f"--model-lib '{model_lib}' must be letters, digits and '_' only "
            "(it prefixes the library's symbols)"
        )
    if model_url is not None and not re.fullmatch(r"https?://\S+", model_url):
        raise UserError(f"--model-url '{model_url}' is not an http(s) URL")
    progress = not as_json
    is_bundle = layout.is_bundle(model_dir)
    if is_bundle:
        chat = layout.read_chat_config(model_dir)
        spec = _for_target(ModelSpec.from_chat_config(chat), target)
        output = output or Path(model_dir)
        require_weights_match(spec, Path(model_dir))
    else:
        if output is None:
            raise UserError("give the bundle folder with -o (e.g. -o dist/my-model)")
        model_dir = _model_folder(model_dir)
        spec = _spec(model_dir, quantization, preset, target, sizes)
    lib_name = model_lib or default_model_lib(model_dir, spec, target)
    app_config = None
    with staged(output, needs_bytes=None if is_bundle else weight_bytes(spec)) as stage:
        if not is_bundle:
            write_chat_config(model_dir, spec, stage, conv_template)
        # For a device with limits the library comes first: its guards refuse a model the
        # device cannot hold within seconds, not after a long weight conversion.
        library_first = target_spec.limits is not None
        if library_first:
            lib, metadata = write_library(spec, target, stage, lib_name, progress)
        if not is_bundle:
            write_weights(model_dir, spec, stage, progress, allow_non_finite)
        if not library_first:
            lib, metadata = write_library(spec, target, stage, lib_name, progress)
        if target_spec.system_lib:  # a phone bundle: the app's entry for it
            from .bundle.app_config import write_app_config

            app_config = write_app_config(
                stage,
                Path(output).absolute().name,
                lib_name,
                metadata,
                spec.scheme.dtype,
                weights_dir=None if layout.has_weights(stage) else Path(output),
                model_url=model_url,
            )
    lib = layout.library_path(output, lib_name, lib.suffix)
    summary = {
        "bundle": str(output),
        "model_lib": lib_name,
        "library": str(lib),
        "target": target,
        "quantization": spec.scheme.name,
        **spec.runtime_sizes,
    }
    lines = [f"bundle ready: {output} (library {lib.relative_to(output)})"]
    if app_config is not None:
        entry = app_config["model_list"][0]
        summary["app_config"] = entry
        lines.append(
            f"app entry in mlc-app-config.json: model_id {entry['model_id']}, "
            f"estimated VRAM {entry['estimated_vram_bytes'] / 2**20:.1f} MiB"
        )
    _emit(as_json, summary, lines)


@cli.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--raw", is_flag=True, help="feed the prompt as is, without the chat template")
@click.option("--json", "as_json", is_flag=True, help="print token ids, text and speeds as JSON")
def run_cmd(
    bundle: Path,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    raw: bool,
    as_json: bool,
) -> None:
    """Generate from PROMPT with a bundle compiled for this machine."""
    from .runtime import Engine, Sampler

    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    try:
        sampler = Sampler(temperature, top_p, seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    engine = Engine(bundle)
    ids = engine.prompt_ids(prompt, chat=not raw)
    printed = ""
    generated: list[int] = []

    def stream(token: int) -> None:
        nonlocal printed
        generated.append(token)
        if as_json:
            return
        text = engine.tokenizer.decode(generated, skip_special_tokens=True)
        # Print only complete characters: a partial UTF-8 sequence decodes to U+FFFD.
        if not text.endswith("\ufffd"):
            click.echo(text[len(printed) :], nl=False)
            printed = text

    result = engine.generate(ids, max_tokens, sampler, on_token=stream)
    result.text = engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    click.echo(result.text[len(printed) :])
    click.echo(
        f"[{result.finish_reason}] prefill {result.prompt_tokens} tokens "
        f"{result.prefill_tokens_per_s:.1f} tok/s, decode {len(result.token_ids)} tokens "
        f"{result.decode_tokens_per_s:.1f} tok/s",
        err=True,
    )


@cli.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "-p",
    "--n-prompt",
    "--pp",
    "n_prompt",
    default="16,64",
    show_default=True,
    help="prompt processing tests: tokens prefilled, comma-separated (0 skips)",
)
@click.option(
    "-n",
    "--n-gen",
    "--tg",
    "n_gen",
    default="32",
    show_default=True,
    help="text generation tests: tokens decoded, comma-separated (0 skips)",
)
@click.option(
    "-r",
    "--repetitions",
    type=int,
    default=5,
    show_default=True,
    help="timed runs of each test (after one untimed warm-up)",
)
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Choice(["md", "json", "csv"]),
    default="md",
    show_default=True,
    help="table, JSON list or CSV",
)
@click.option("--json", "as_json", is_flag=True, help="same as -o json")
@click.option("--csv", "as_csv", is_flag=True, help="same as -o csv")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="check the library runs on this device (default: the one it was built for)",
)
@click.option(
    "-t",
    "--threads",
    type=int,
    default=None,
    help="CPU threads of TVM's thread pool (default: one per physical core)",
)
@click.option("--seed", type=int, default=0, show_default=True, help="for the random token ids")
def bench_cmd(
    bundle: Path,
    n_prompt: str,
    n_gen: str,
    repetitions: int,
    output: str,
    as_json: bool,
    as_csv: bool,
    device: str | None,
    threads: int | None,
    seed: int,
) -> None:
    """Prompt processing (pp N) and text generation (tg N) speed, as llama-bench.

    pp N prefills N random tokens into an empty KV cache in chunks of the bundle's
    prefill_chunk_size; tg N decodes N tokens one at a time from an empty cache. Each test
    runs once untimed, then -r times; t/s is mean ± standard deviation.

    -o json prints a list with one object per test: model, model_type, model_lib,
    quantization, target, backend, device, n_params, size (weight bytes), threads, test,
    n_prompt, n_gen, prefill_chunk_size, context_window_size, repetitions, avg_ts,
    stddev_ts, samples_ts, avg_ns, stddev_ns, samples_ns, test_time. -o csv has the same
    columns (lists joined with ';').
    """
    import os

    from .runtime import bench

    if as_json and as_csv:
        raise UserError("give one of --json and --csv")
    output = "json" if as_json else "csv" if as_csv else output
    prompts = bench.parse_counts(n_prompt, "-p/--n-prompt")
    gens = bench.parse_counts(n_gen, "-n/--n-gen")
    bench.check_counts(prompts, gens, repetitions, bench.bundle_context_window(bundle))
    if threads is not None:
        if threads < 1:
            raise UserError("-t/--threads must be at least 1")
        os.environ["TVM_NUM_THREADS"] = str(threads)  # read when the thread pool starts
    import tvm

    from .runtime import Engine

    engine = Engine(bundle, device=device)
    used = threads or int(tvm.get_global_func("runtime.NumThreads")())
    results = bench.run_bench(engine, prompts, gens, repetitions, used, seed)
    text = {"md": bench.markdown, "json": bench.as_json, "csv": bench.as_csv}[output](results)
    click.echo(text.rstrip("\n"))


@cli.command("memory")
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--target",
    default=None,
    help="see `mlc-edge targets` (default: a CPU bundle's own, else android-opencl)",
)
@click.option(
    "--reported-memory",
    default=None,
    help="the device's CL_DEVICE_GLOBAL_MEM_SIZE, e.g. 5.4GB (default: the target's)",
)
@click.option("--budget", default="12GB", show_default=True, help="peak memory allowed")
@click.option(
    "--compare", is_flag=True, help="the same for edge-512, edge-768 and MLC-LLM's default settings"
)
@click.option("--json", "as_json", is_flag=True, help="print the plans as JSON")
@_size_options
def memory_cmd(
    source: Path,
    target: str | None,
    reported_memory: str | None,
    budget: str,
    compare: bool,
    as_json: bool,
    preset: str | None,
    quantization: str,
    **sizes: int | None,
) -> None:
    """GPU memory of a bundle, or of MODEL_DIR / config.json / a .gguf for --target and
    --preset.

    Weights, KV cache, planned temporaries, logits, runtime overhead; the largest buffer
    against the device's largest allocation; whether MLC's engine loads it.
    """
    from .compiler.targets import get_target
    from .memory import parse_size, plan_from_bundle, plan_from_config, table

    if target is not None:
        get_target(target).require_buildable()
    try:
        reported = parse_size(reported_memory) if reported_memory is not None else None
        budget_bytes = parse_size(budget)
    except ValueError as e:
        raise UserError(str(e)) from None
    is_bundle = layout.is_bundle(source)
    if is_bundle and (preset or any(v is not None for v in sizes.values())):
        raise UserError(
            "a bundle's sizes are its own: give MODEL_DIR or config.json to "
            "plan other sizes (or --compare)"
        )
    # --compare plans each of several schemes given as --quantization q0f16t,q4f16t.
    schemes = [q.strip() for q in quantization.split(",") if q.strip()]
    if len(schemes) > 1 and (is_bundle or not compare):
        raise UserError(
            f"--quantization {quantization}: several schemes are for --compare on "
            "MODEL_DIR or config.json; give one otherwise"
        )
    hf_config = layout.read_model_config(source if is_bundle else _config_folder(source))
    plans = []
    if is_bundle:
        plan, target = plan_from_bundle(Path(source), target, reported, budget_bytes)
        plans.append(plan)
        schemes = [plan.quantization]
    else:
        target = target or "android-opencl"
    for scheme in schemes:
        first = len(plans)
        tag = f" {scheme}" if len(schemes) > 1 else ""
        if not is_bundle:
            plans.append(
                plan_from_config(
                    hf_config,
                    target,
                    preset,
                    scheme,
                    sizes,
                    reported,
                    budget_bytes,
                    label=f"{preset or 'edge-512'}{tag}",
                )
            )
        if compare:
            plain = not is_bundle and all(v is None for v in sizes.values())
            for name in ("edge-512", "edge-768", "mlc-default"):
                if plain and plans[first].label == name + tag:
                    continue  # already the first plan
                plans.append(
                    plan_from_config(
                        hf_config,
                        target,
                        name,
                        scheme,
                        {},
                        reported,
                        budget_bytes,
                        label=name + tag,
                    )
                )
    _emit(
        as_json,
        {"source": str(source), "target": target, "plans": [p.as_dict() for p in plans]},
        table(plans),
    )


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True)
def targets_cmd(as_json: bool) -> None:
    """List the compile targets, their device limits, and what this machine can do."""
    from .compiler.targets import TARGETS

    rows = [t.describe() for t in TARGETS.values()]
    lines = []
    for t, r in zip(TARGETS.values(), rows, strict=True):
        build = "builds here" if r["can_build"] else f"cannot be built here: {r['build_problem']}"
        run = "runs here" if r["runs_here"] else "does not run here"
        if r.get("run_problem"):
            run += f" ({r['run_problem']})"
        lines.append(f"{r['name']:<26} {r['description']}")
        lines.append(f"{'':<26} preset {r['default_preset']}; {r['library']}; {build}; {run}")
        if t.limits is not None:
            lines.append(f"{'':<26} limits: {t.limits.summary()}")
    # The Android app build (mlc-edge package / push): which of its tools are here.
    from .android.toolchain import find_toolchain

    tools = find_toolchain().all()
    lines.append("")
    lines.append("Android app build (mlc-edge package, push):")
    for tool in tools:
        state = f"missing: {tool.problem}" if tool.problem else f"ok ({tool.version or tool.path})"
        lines.append(f"  {tool.name:<30} {state}")
    _emit(as_json, {"targets": rows, "android_build": [t.as_dict() for t in tools]}, lines)


@cli.command("package")
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="DIST folder: the APK, mlc-app-config.json, libmodel_android.a, mlc4j",
)
@click.option(
    "--mlc-llm-source",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("MLC_LLM_SOURCE_DIR"),
    help="mlc-llm checkout at the pinned commit [MLC_LLM_SOURCE_DIR]",
)
@click.option(
    "--tvm-source",
    type=click.Path(path_type=Path),
    default=lambda: os.environ.get("TVM_SOURCE_DIR"),
    help="TVM checkout at the wheel's commit [TVM_SOURCE_DIR]",
)
@click.option(
    "--build-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="CMake/Gradle work and logs (default: DIST.build; kept for the next run)",
)
@click.option("--release", is_flag=True, help="a signed release APK (default: debug)")
@click.option("--keystore", type=click.Path(path_type=Path), default=None)
@click.option("--key-alias", default=None)
@click.option(
    "--memory-floor-gb",
    type=click.IntRange(1, 1024),
    default=16,
    show_default=True,
    help="the OpenCL memory the engine assumes at least (upstream: 5)",
)
@click.option(
    "--reported-memory",
    default=None,
    help="the phone's CL_DEVICE_GLOBAL_MEM_SIZE for the memory verdict, e.g. 5.4GB",
)
@click.option("-j", "--jobs", type=int, default=os.cpu_count() or 4, show_default=True)
@click.option("--dry-run", is_flag=True, help="check, then print every command; build nothing")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def package_cmd(
    bundles: tuple[Path, ...],
    output: Path,
    mlc_llm_source: Path | None,
    tvm_source: Path | None,
    build_dir: Path | None,
    release: bool,
    keystore: Path | None,
    key_alias: str | None,
    memory_floor_gb: int,
    reported_memory: str | None,
    jobs: int,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Build MLC-LLM's Android app (MLCChat) around phone BUNDLES: one APK.

    Checks every tool first (NDK, SDK, JDK, CMake, Ninja, Rust, the TVM and mlc-llm
    sources, the bundles, each model's memory verdict), then patches mlc-llm, packs the
    libraries, builds mlc4j with CMake and the app with Gradle. Weights stay out of the
    APK: `mlc-edge push DIST` installs it and pushes them.
    """
    from .android.package import PackageOptions, package
    from .memory import parse_size

    try:
        reported = parse_size(reported_memory) if reported_memory is not None else None
    except ValueError as e:
        raise UserError(str(e)) from None
    opts = PackageOptions(
        bundles=list(bundles),
        dist=output,
        mlc_llm_source=_abs(mlc_llm_source),
        tvm_source=_abs(tvm_source),
        build_dir=_abs(build_dir),
        release=release,
        keystore=_abs(keystore),
        key_alias=key_alias,
        memory_floor_gb=memory_floor_gb,
        reported_memory=reported,
        jobs=jobs,
    )
    summary = package(opts, dry_run=dry_run)
    lines = [
        f"{m['model_id']}: lib {m['model_lib']}, {m['total_bytes'] / 2**20:.0f} MiB; "
        f"loads with the {memory_floor_gb} GiB floor: {'yes' if m['loads'] else 'NO'} "
        f"(upstream 5 GiB: {'yes' if m['loads_with_upstream_floor'] else 'no'})"
        for m in summary["models"]
    ]
    if dry_run:
        lines += [f"problem: {p}" for p in summary["problems"]]
        lines += summary["commands"]
    else:
        lines.append(
            f"APK ready: {summary['apk']} (install it and push the weights: mlc-edge push {output})"
        )
    _emit(as_json, summary, lines)
    if dry_run and summary["problems"]:
        sys.exit(1)


@cli.command("push")
@click.argument("dist", type=click.Path(path_type=Path))
@click.option("-s", "--serial", default=None, help="the phone's adb serial (adb devices)")
@click.option("--no-install", is_flag=True, help="push the weights only")
@click.option("--dry-run", is_flag=True, help="print the adb commands; run nothing")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def push_cmd(
    dist: Path, serial: str | None, no_install: bool, dry_run: bool, as_json: bool
) -> None:
    """Install DIST's APK (mlc-edge package) and push each model's weights with adb."""
    from .android.push import push

    summary = push(dist, os.environ, serial=serial, install=not no_install, dry_run=dry_run)
    lines = (
        summary["commands"]
        if dry_run
        else [f"installed and pushed: {len(summary['commands'])} adb commands"]
    )
    _emit(as_json, summary, lines)


def _abs(path: Path | None) -> Path | None:
    return Path(path).absolute() if path is not None else None


@cli.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--target", default=None, help="OpenCL target (default: the bundle's, else android-opencl)"
)
@click.option("--preset", default=None, help="runtime sizes when PATH is a config.json")
@click.option(
    "--quantization",
    default="q0f16t",
    show_default=True,
    help="weight scheme when PATH is a config.json",
)
@click.option(
    "--num-hidden-layers",
    type=int,
    default=None,
    help="compile this many layers (the kernels are the same; faster)",
)
@click.option(
    "--seq-lens",
    default="1,7,16",
    show_default=True,
    help="prefill chunk lengths each seq_len kernel runs with",
)
@click.option("--only", default=None, help="check only functions matching this regex")
@click.option(
    "--fp16",
    type=click.Choice(["auto", "float"]),
    default="auto",
    show_default=True,
    help="auto: native fp16 where the device has cl_khr_fp16, else half as float",
)
@click.option(
    "--device",
    default=None,
    help="OpenCL implementation or device: intel, pocl, oclgrind, or a name "
    "(default: the best present, one with real fp16 first)",
)
@click.option("--strict", is_flag=True, help="count known issues (TVM's kernels) as failures")
@click.option(
    "--races",
    is_flag=True,
    help="instead: run every kernel on Oclgrind; any data race, invalid or "
    "uninitialised access fails",
)
@click.option(
    "--traffic",
    is_flag=True,
    help="instead: bytes each kernel of a decode step and a prefill chunk moves "
    "(Oclgrind), and the predicted decode tokens/s on each Adreno",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def verify_cmd(
    path: Path,
    target: str | None,
    preset: str | None,
    quantization: str,
    num_hidden_layers: int | None,
    seq_lens: str,
    only: str | None,
    fp16: str,
    device: str | None,
    strict: bool,
    races: bool,
    traffic: bool,
    as_json: bool,
) -> None:
    """Run every OpenCL kernel of a bundle (or a config.json, model folder or .gguf) on
    this machine's OpenCL device and compare it with the same function compiled for the CPU.

    Exits non-zero when a kernel fails, or when the bundle's library holds kernels other
    than the ones recompiled from its config (recompile it).
    """
    from .bundle.integrity import before_verify
    from .verify import load_source, verify

    # A bundle's weights first (size and md5), for a bundle of any target.
    checked = before_verify(path, target)
    if checked.kernels_not_checked:
        _emit(as_json, {"bundle": str(path), **checked.as_dict()}, checked.lines())
        return
    if checked.weights and not as_json:
        click.echo(checked.weights.line(), err=True)
    try:
        lens = tuple(int(s) for s in seq_lens.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--seq-lens '{seq_lens}': give numbers like 1,7,16") from None
    if not lens or min(lens) < 1:
        raise UserError("--seq-lens must be positive numbers")
    config_path = _config_folder(path)
    source = load_source(config_path, target, preset, quantization, num_hidden_layers)
    source.path = path  # reports name what was given, not a GGUF's config folder
    if races or traffic:
        _verify_on_oclgrind(
            source, config_path, target, preset, quantization, lens, only, races, traffic, as_json
        )
        return
    if not as_json:
        click.echo(
            f"compiling {source.spec.family.model_type} for {source.target_name} "
            "and checking its kernels ...",
            err=True,
        )
    report = verify(source, fp16=fp16, seq_lens=lens, only=only, strict=strict, device=device)
    _emit(as_json, report.as_dict(), report.lines())
    if not report.passed:
        sys.exit(1)


def _verify_on_oclgrind(
    source: Any,
    path: Path,
    target: str | None,
    preset: str | None,
    quantization: str,
    lens: tuple[int, ...],
    only: str | None,
    races: bool,
    traffic: bool,
    as_json: bool,
) -> None:
    """``verify --races`` / ``--traffic`` (mlc_edge/verify/oclgrind.py, traffic.py)."""
    from .verify import load_source, oclgrind
    from .verify import traffic as traffic_mod

    def progress(line: str) -> None:
        if not as_json:
            click.echo(line, err=True)

    data: dict[str, Any] = {}
    lines: list[str] = []
    failed = False
    if races:
        report = oclgrind.races(source, lens, only, progress=progress)
        data["races"], failed = report.as_dict(), not report.passed
        lines += report.lines()
    if traffic:
        # the model's own layer count, for the totals of a library compiled with fewer
        model_layers = load_source(path, target, preset, quantization).spec.model_config[
            "num_hidden_layers"
        ]
        counted = traffic_mod.traffic(source, model_layers, progress=progress)
        data["traffic"] = counted.as_dict()
        lines += counted.lines()
        # a decode step fails on any kernel over the limit (a linear layer is one too)
        failed = failed or any(
            s.over_limit() or s.kernels_over_limit() for s in counted.steps if s.step == "decode"
        )
    _emit(as_json, data if len(data) > 1 else next(iter(data.values())), lines)
    if failed:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="mlc-edge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
