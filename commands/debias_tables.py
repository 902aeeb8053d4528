"""Tables `posvit debias-train` prints on stderr: the retrofit's log rows and summary, and each head's summary."""

from __future__ import annotations

from posvit_cli._cli import console

__all__ = ["print_head_summary", "print_log_row", "print_summary"]


def _fmt(v, nd=4) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def print_log_row(row: dict) -> None:
    event = row.get("event")
    if event == "teacher":
        r2 = " ".join(f"{t} {_fmt(row.get(f'r2_{t}'), 3)}" for t in ("lr", "ud", "diag", "radial", "xy"))
        console.print(f"teacher at {row['size']} px: stack R2 {r2}; blanked channels {row['channels_blanked']}")
    elif event == "eval":
        r2 = " ".join(f"{t} {_fmt(row.get(f'r2_{t}'), 3)}" for t in ("lr", "ud", "diag", "radial", "xy"))
        console.print(
            f"step {row['step']} (stage {row['stage']}, {row['size']} px, epoch {row['epoch']:.2f}): "
            f"train {_fmt(row.get('train_loss'))} · val {_fmt(row.get('val_loss'))} · "
            f"cos {_fmt(row.get('val_cosine'))} · R2 {r2}"
        )


def print_summary(result, teacher, config) -> None:
    from rich.table import Table

    t = Table(title=f"posvit debias-train {config.method} → {result.output}", show_header=False,
              title_justify="left")
    t.add_row("teacher", f"{teacher.name} ({teacher.embed_dim} channels, weights {teacher.weights})")
    if config.method == "alibi":
        a = config.alibi
        t.add_row("ALiBi", f"slopes {a.slopes} (m={a.slope}), {a.distance}, wrap {a.wrap}, normalize {a.normalize}")
    t.add_row("stages", ", ".join(f"{s.size} px × {s.epochs:g} ep (lr {s.lr:g}, batch {s.batch_size})"
                                  for s in config.stages))
    t.add_row("images", f"{result.train_images} train, {result.val_images} validation")
    t.add_row("blanked channels", str(result.channels_blanked))
    t.add_row("steps", str(result.steps))
    f = result.final
    t.add_row("final", f"val loss {_fmt(f.get('val_loss'))}, cos {_fmt(f.get('val_cosine'))}, "
                       f"stack R2 xy {_fmt(f.get('r2_xy'), 3)}")
    for size, r2 in result.teacher_r2.items():
        t.add_row(f"teacher R2 @{size}", f"xy {_fmt(r2.get('xy'), 3)}")
    # The monitor's R² is measured on its own images (noise by default), so it need not equal `posvit probe`'s.
    t.add_row("R2 protocol", f"holdout probe on the monitor images ({config.monitor_size} size), fraction "
                             f"{config.r2_fraction:.3g}, {config.r2_repeats} repeats")
    t.add_row("log", result.log_csv)
    t.add_row("time", f"{result.seconds:.1f} s")
    console.print(t)


def print_head_summary(s: dict) -> None:
    from rich.table import Table

    t = Table(title=f"posvit debias-train {s['method']} → {s['output']}", show_header=False,
              title_justify="left")
    if s.get("store"):
        t.add_row("input", f"{s['store']}" + (f" ({s['images']} images, {s['tokens']} tokens)" if "tokens" in s else ""))
    if s.get("views"):
        v = s["views"]
        t.add_row("views", f"{v['views']} views of {v['images']} images → {v['cache']}")
    if s["method"] == "rasa":
        t.add_row("planes", f"{s['planes']} ({'exact projector' if s['exact'] else 'sequential, training order'}, "
                            f"rank {s['rank']})")
        if s.get("rounds"):
            last = s["rounds"][-1]
            t.add_row("coordinate MSE", f"{s['rounds'][0]['probe_mse_before']:.4f} → {last['probe_mse_after']:.4f} "
                                        f"(constant predictor {last['constant_mse']:.4f})")
            t.add_row("cos(raw, clean)", f"{last['cosine']:.4f}")
    elif s["method"] == "blank":
        what = "set to their dataset means" if s.get("fill") == "mean" else "zeroed"
        t.add_row(f"channels {what}", f"{s['channels_zeroed']} ({s['channel_source']})")
    elif s["method"] == "posmean":
        t.add_row("mean field", f"{s['grid'][0]}×{s['grid'][1]} reference grid from {s['images']} images "
                                f"(RMS {s['field_rms']:.4g} per channel)")
    elif s["method"] == "svd":
        t.add_row("subspace", f"rank {s['rank']} from a constant {s['size'][0]}×{s['size'][1]} px image "
                              f"({100 * s['explained']:.1f}% of its positional variance)")
    elif s["method"] == "tta":
        t.add_row("transforms", ", ".join(s["transforms"]))
    rep = s.get("report")
    if rep:
        for tgt in ("lr", "ud", "diag", "radial", "xy"):
            b, a = rep["before"].get(tgt), rep["after"].get(tgt)
            t.add_row(f"stack R2 {tgt}", f"{_fmt(b, 3)} → {_fmt(a, 3)}")
        t.add_row("R2 protocol", rep.get("protocol") or f"{rep['images']} images")
    t.add_row("head format", s["head_format"])
    t.add_row("time", f"{s['seconds']:.1f} s")
    console.print(t)
