"""Evaluation through a live endpoint: ``bdserve eval``, ``bdserve physical``, ``bdserve study``.

    heldout.py   clean and triggered held-out sets from the test split (Eq. 3), stamped in uint8
    runner.py    batches sent concurrently through bdserve.client (its transports, retries and typed
                 answers) with a progress bar; every image ends correct, wrong or error
    stats.py     Wilson intervals, latency percentiles
    report.py    per-defense metrics, JSON and Markdown, the paper's Table-1 row
    plots.py     PNG charts: accuracy/ASR per defense with Wilson bars, confusion matrices, study figures
    photos.py    camera photos uploaded as they are; per-photo report and contact sheet
    physical.py  print-and-photograph simulation of triggered test images
    studies.py   Section 3 through the service: trigger location (Fig. 4) and appearance (Fig. 5)
"""
