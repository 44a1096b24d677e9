"""SUVbw from Units other than BQML: Philips CNTS, GML of each SUV type, CM2ML.

Synthetic headers, numbers computed by hand in the comments. The patient is 70 kg, 1.75 m; the
dose 370 MBq F-18 injected 10:00, scan 11:00 (decayed dose 2.53314180e8 Bq, so one Bq/ml is
HAND_FACTOR = 70 000 g / 2.53314180e8 Bq = 2.7633668e-4 SUVbw).
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicomnode.imaging.suv import SuvError, suv_bw_factor

HAND_FACTOR = 70_000 / 2.5331418024164078e8
PHILIPS = "Philips PET Private Group"


def header(units: str, **changes) -> Dataset:
    drug = Dataset()
    drug.RadiopharmaceuticalStartDateTime = "20250101100000"
    drug.RadionuclideTotalDose = "370000000"
    drug.RadionuclideHalfLife = "6586.2"
    ds = Dataset()
    ds.Modality = "PT"
    ds.Manufacturer = "Philips Medical Systems" if units == "CNTS" else "Synthetic"
    ds.Units = units
    ds.DecayCorrection = "START"
    ds.PatientWeight = "70"
    ds.PatientSize = "1.75"
    ds.PatientSex = "M"
    ds.SeriesDate = ds.AcquisitionDate = "20250101"
    ds.SeriesTime = ds.AcquisitionTime = "110000"
    ds.RadiopharmaceuticalInformationSequence = [drug]
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


# --- Philips CNTS -------------------------------------------------------------------------


def test_philips_suv_scale_factor_gives_suvbw_directly():
    ds = header("CNTS")
    ds.private_block(0x7053, PHILIPS, create=True).add_new(0x00, "DS", "0.000512")
    result = suv_bw_factor(ds)
    assert result.factor == pytest.approx(0.000512, rel=1e-12)  # no dose or time needed
    assert "(7053,1000)" in result.attributes["Philips SUV scale factor"]
    assert "DecayTime" not in result.attributes


def test_philips_activity_concentration_scale_factor_gives_bq_per_ml():
    # 0.5 Bq/ml per rescaled unit, then BQML: 0.5 * 2.7633668e-4 = 1.3816834e-4.
    ds = header("CNTS")
    ds.private_block(0x7053, PHILIPS, create=True).add_new(0x09, "DS", "0.5")
    result = suv_bw_factor(ds)
    assert result.factor == pytest.approx(0.5 * HAND_FACTOR, rel=1e-9)
    assert result.factor == pytest.approx(1.3816834e-4, rel=1e-7)
    assert "(7053,1009)" in result.attributes["Philips activity concentration scale factor"]


def test_philips_suv_scale_factor_wins_over_activity_factor():
    ds = header("CNTS")
    block = ds.private_block(0x7053, PHILIPS, create=True)
    block.add_new(0x00, "DS", "0.0005")
    block.add_new(0x09, "DS", "0.5")
    assert suv_bw_factor(ds).factor == pytest.approx(0.0005, rel=1e-12)


def test_philips_factor_found_in_whichever_block_its_creator_reserved():
    # Another creator holds block 10 with a decoy at (7053,1000); Philips reserved block 11.
    ds = header("CNTS")
    ds.private_block(0x7053, "SOME OTHER CREATOR", create=True).add_new(0x00, "DS", "99")
    ds.private_block(0x7053, PHILIPS, create=True).add_new(0x00, "DS", "0.0005")
    assert (0x7053, 0x1100) in ds
    result = suv_bw_factor(ds)
    assert result.factor == pytest.approx(0.0005, rel=1e-12)
    assert "(7053,1100)" in result.attributes["Philips SUV scale factor"]


def test_philips_factor_read_as_un_bytes():
    # An implicit-VR file without a dictionary entry gives the value as UN bytes.
    ds = header("CNTS")
    ds.private_block(0x7053, PHILIPS, create=True).add_new(0x09, "UN", b"0.5 ")
    assert suv_bw_factor(ds).factor == pytest.approx(0.5 * HAND_FACTOR, rel=1e-9)


def test_philips_factor_without_creator_needs_manufacturer_philips():
    # Creator stripped (as in the OncoRay DROs): read at (7053,1000) only for a Philips series.
    ds = header("CNTS")
    ds.add_new((0x7053, 0x1000), "DS", "0.0005")
    assert suv_bw_factor(ds).factor == pytest.approx(0.0005, rel=1e-12)
    ds.Manufacturer = "SIEMENS"
    with pytest.raises(SuvError) as err:
        suv_bw_factor(ds)
    assert err.value.attribute == "Units"


def test_philips_cnts_without_any_factor_is_refused():
    with pytest.raises(SuvError) as err:
        suv_bw_factor(header("CNTS"))
    assert err.value.attribute == "Units" and "CNTS" in err.value.reason


def test_philips_factor_not_positive_is_named():
    ds = header("CNTS")
    ds.private_block(0x7053, PHILIPS, create=True).add_new(0x00, "DS", "0")
    with pytest.raises(SuvError) as err:
        suv_bw_factor(ds)
    assert "(7053,1000)" in err.value.attribute


# --- GML and CM2ML: an SUV already, converted back to body weight --------------------------


def test_gml_with_suv_type_bw_is_used_as_is():
    # Pixel values are SUVbw already: no dose, time or radiopharmaceutical needed.
    ds = header("GML", SUVType="BW", RadiopharmaceuticalInformationSequence=None)
    result = suv_bw_factor(ds)
    assert result.factor == 1.0
    assert result.attributes["SUVType"] == "BW"


def test_gml_without_suv_type_is_body_weight():
    assert suv_bw_factor(header("GML")).factor == 1.0


@pytest.mark.parametrize(
    "suv_type, sex, normaliser_kg",
    [
        # James 128: men 1.10 W - 128 (W/H)^2 = 77 - 128 * 0.16 = 56.52 kg
        ("LBMJAMES128", "M", 56.52),
        # women 1.07 W - 148 (W/H)^2 = 74.9 - 23.68 = 51.22 kg
        ("LBMJAMES128", "F", 51.22),
        # other: mean of the two = 53.87 kg
        ("LBMJAMES128", "O", 53.87),
        # Janmahasatian, BMI 70 / 1.75^2 = 22.857: men 9270 * 70 / (6680 + 216 BMI) = 55.8571 kg
        ("LBMJANMA", "M", 648_900 / (6680 + 216 * 70 / 1.75**2)),
        # Sugawara IBW, 175 cm: men 48 + 1.06 * 23 = 72.38 kg
        ("IBW", "M", 72.38),
        # women 45.5 + 0.91 * 23 = 66.43 kg; other: mean 69.405 kg (as DRO_2_2)
        ("IBW", "F", 66.43),
        ("IBW", "O", 69.405),
    ],
)
def test_gml_lean_and_ideal_body_weight_back_to_body_weight(suv_type, sex, normaliser_kg):
    # SUVbw = SUVx * body weight / normalising mass
    result = suv_bw_factor(header("GML", SUVType=suv_type, PatientSex=sex))
    assert result.factor == pytest.approx(70 / normaliser_kg, rel=1e-9)


def test_janmahasatian_hand_value():
    # 648 900 / (6680 + 4937.142857) = 55.857108 kg
    result = suv_bw_factor(header("GML", SUVType="LBMJANMA", PatientSex="M"))
    assert result.factor == pytest.approx(70 / 55.857108, rel=1e-7)


def test_cm2ml_is_body_surface_area_back_to_body_weight():
    # Du Bois: 0.007184 * 70^0.425 * 175^0.725 = 1.8481430 m2 = 18 481.430 cm2;
    # SUVbw = SUVbsa * 70 000 g / 18 481.430 cm2 = SUVbsa * 3.787589.
    for changes in ({}, {"SUVType": "BSA"}):
        result = suv_bw_factor(header("CM2ML", **changes))
        assert result.factor == pytest.approx(70_000 / 18_481.430181, rel=1e-9)
        assert result.factor == pytest.approx(3.787589, rel=1e-6)


@pytest.mark.parametrize(
    "units, changes, attribute",
    [
        ("GML", {"SUVType": "IBW", "PatientSex": None}, "PatientSex"),
        ("GML", {"SUVType": "IBW", "PatientSex": "U"}, "PatientSex"),
        ("GML", {"SUVType": "LBMJAMES128", "PatientSize": None}, "PatientSize"),
        ("GML", {"SUVType": "IBW", "PatientSize": "0"}, "PatientSize"),
        ("GML", {"SUVType": "IBW", "PatientSize": "175"}, "PatientSize"),  # cm, not m
        ("GML", {"SUVType": "LBMJAMES128", "PatientWeight": None}, "PatientWeight"),
        ("GML", {"SUVType": "LBM"}, "SUVType"),  # James 120 or 128? not said
        ("GML", {"SUVType": "BSA"}, "SUVType"),  # BSA is CM2ML
        ("CM2ML", {"SUVType": "BW"}, "SUVType"),
        ("CM2ML", {"PatientSize": None}, "PatientSize"),
    ],
)
def test_undefined_suv_conversion_is_named(units, changes, attribute):
    with pytest.raises(SuvError) as err:
        suv_bw_factor(header(units, **changes))
    assert err.value.attribute == attribute
