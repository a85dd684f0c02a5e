"""The figures of the reports (metrics.png, curve.png): matplotlib without a display, a figure as PNG bytes."""
from __future__ import annotations

import io


def pyplot():
    """matplotlib.pyplot on the Agg backend (workers and CI have no display); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    """``fig`` laid out and rendered as PNG (100 dpi), then closed."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    return buf.getvalue()
