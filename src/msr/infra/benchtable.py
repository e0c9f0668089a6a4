"""The ``msr bench`` table as text, torch-free (a GPU visit's summary formats the tables its
bench steps wrote as JSON without importing torch)."""

from __future__ import annotations

TABLE_HEADER = f"{'arch':<10} {'variant':<10} {'method':<19} {'models':>6} {'ms/step':>9} {'img/s':>9} {'x eager':>8}  note"


def format_row(r: dict) -> str:
    if r["status"] != "ok":
        nums = f"{'-':>9} {'-':>9} {'-':>8}"
        note = r["status"] + (f": {r['note']}" if r["note"] else "")
    else:
        x = f"{r['speedup_vs_eager']:.2f}" if r["speedup_vs_eager"] else "-"
        nums = f"{r['ms_per_step']:9.2f} {r['images_per_s']:9.0f} {x:>8}"
        note = r["note"]
    return f"{r['arch']:<10} {r['variant']:<10} {r['method']:<19} {r['models']:>6} {nums}  {note}"


def format_environment(env: dict) -> str:
    return (
        f"msr bench: {env['device_name']} ({env['device']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; "
        f"{env['threads']} threads of {env['cpus']} CPUs), {env['precision']}, channels_last={env['channels_last']}, "
        f"batch {env['batch_size']} x {'x'.join(map(str, env.get('image_shape', (3, 32, 32))))}, K={env['k']}; median of {env['windows']} windows of {env['steps_per_window']} steps "
        f"after {env['warmup_steps']} warm-up steps"
    )


def format_table(result: dict) -> str:
    return "\n".join([format_environment(result["environment"]), TABLE_HEADER, *map(format_row, result["rows"])])


__all__ = ["TABLE_HEADER", "format_environment", "format_row", "format_table"]
