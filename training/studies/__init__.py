"""The studies that reproduce and extend the paper's experiments, one module each.

* :mod:`.table1` — the paper's Table 1 grid (encoding x decoding x rule x seed);
* :mod:`.predictive` — predictive coding with drifting blobs (Figure 2);
* :mod:`.ablation` — the ``vdib`` rule's fixes switched on in turn;
* :mod:`.tsne` — t-SNE of readout spike windows (Figure 3);
* :mod:`.time_vs_rate` — time minus rate decoding versus the budget and τ_d;
* :mod:`.dvs_dt` — MNIST-DVS at other bin widths;
* :mod:`.report` — their tables and plots; :mod:`.common` — output folders and cell records.

Studies write to ``runs/`` by default; ``--out docs/results`` refreshes the committed results.
"""
