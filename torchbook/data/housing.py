"""The book's California housing table (chapter 2), as the recipes that use it share it: the columns, the
income-stratified split, and the eight features of scikit-learn's version of the data (chapters 9-10)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

TARGET = "median_house_value"
NUMERIC_INPUTS = ["longitude", "latitude", "housing_median_age", "total_rooms", "total_bedrooms", "population",
                  "households", "median_income"]
CATEGORICAL_INPUTS = ["ocean_proximity"]
INPUTS = NUMERIC_INPUTS + CATEGORICAL_INPUTS
OCEAN_PROXIMITY = ("<1H OCEAN", "INLAND", "ISLAND", "NEAR BAY", "NEAR OCEAN")  # the book's five categories
INCOME_BINS = [0.0, 1.5, 3.0, 4.5, 6.0, np.inf]


@dataclass
class Split:
    train: pd.DataFrame
    test: pd.DataFrame

    def xy(self, part: str) -> tuple[pd.DataFrame, pd.Series]:
        frame = getattr(self, part)
        return frame[INPUTS], frame[TARGET]


def income_category(frame: pd.DataFrame) -> pd.Series:
    return pd.cut(frame["median_income"], bins=INCOME_BINS, labels=[1, 2, 3, 4, 5])


def stratified_split(frame: pd.DataFrame, test_size: float = 0.2, seed: int = 42) -> Split:
    """The book's split: stratified on the income category, so both sets keep its proportions."""
    train, test = train_test_split(frame, test_size=test_size, stratify=income_category(frame), random_state=seed)
    return Split(train, test)


def housing_features(frame: pd.DataFrame) -> pd.DataFrame:
    """The eight features of scikit-learn's California housing set, computed from the book's archive."""
    households = frame["households"]
    return pd.DataFrame({
        "MedInc": frame["median_income"],
        "HouseAge": frame["housing_median_age"],
        "AveRooms": frame["total_rooms"] / households,
        "AveBedrms": frame["total_bedrooms"] / households,
        "Population": frame["population"],
        "AveOccup": frame["population"] / households,
        "Latitude": frame["latitude"],
        "Longitude": frame["longitude"],
    })
