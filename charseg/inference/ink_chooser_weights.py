"""Weights of the learned outline rule (outlines.choose_level), written by bench/outline_chooser.py:
2026-12-07, `python bench/outline_chooser.py MODEL --pages 240 --seed 5` with MODEL /tmp/s38/bench_model2.pth, 18190 detections.
Do not edit by hand: run the script again."""

LEVELS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)
# WEIGHTS[i][j]: level feature i (outlines.level_features) times window feature j (outlines.window_features)
WEIGHTS = (
    (4.32903, 0.776698, 5.3092, 1.81754, 4.26571, 2.90775),
    (-2.97043, -1.88136, -8.9505, -1.02295, -5.17528, -2.34741),
    (-0.641208, 0.0177111, 4.90221, 0.490891, -1.45848, 0.022381),
    (0.0538601, 0.0925616, -1.07383, 0.034453, 0.423967, 0.166436),
    (-0.880969, 0.0964746, -0.336276, -0.117373, -0.129126, -0.0918397),
    (1.51616, 0.537456, -3.78582, 0.399161, 1.51045, 0.659756),
    (1.30909, -0.450021, 1.88693, 1.59792, 2.5059, 1.37089),
)
