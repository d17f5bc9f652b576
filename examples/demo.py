"""The main demo: MoE estimators against a plain MLP and gradient boosting, by 5-fold CV.

    make demo          # or: python -m examples.demo

Fits MoERegressor on scikit-learn's bundled diabetes data and MoEClassifier on its breast
cancer data, each in a Pipeline with the same preprocessing as the baselines, and prints a
table of cross-validated scores and fit times.
"""

from __future__ import annotations

import pandas as pd

from benchmarks.accuracy import SUITES, evaluate, to_markdown


def main():
    results = pd.concat([evaluate(name, n_folds=5) for name in SUITES["demo"]], ignore_index=True)
    print(to_markdown(results))


if __name__ == "__main__":
    main()
