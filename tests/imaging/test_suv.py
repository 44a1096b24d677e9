"""SUVbw factor from one PET header: hand-computed values and named failures."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicomnode.imaging.suv import SuvError, suv_bw_factor

# 70 kg, 370 MBq F-18 injected at 10:00, series (and acquisition) at 11:00:
# decayed dose = 3.7e8 * 2^(-3600 / 6586.2) = 2.53314180e8 Bq; factor = 70000 g / that.
HAND_FACTOR = 70_000 / 2.5331418024164078e8  # 2.7633668e-4


def header(**changes) -> Dataset:
    drug = Dataset()
    drug.RadiopharmaceuticalStartDateTime = "20250101100000"
    drug.RadiopharmaceuticalStartTime = "100000"
    drug.RadionuclideTotalDose = "370000000"
    drug.RadionuclideHalfLife = "6586.2"
    ds = Dataset()
    ds.Modality = "PT"
    ds.Units = "BQML"
    ds.DecayCorrection = "START"
    ds.PatientWeight = "70"
    ds.SeriesDate = ds.AcquisitionDate = "20250101"
    ds.SeriesTime = ds.AcquisitionTime = "110000"
    ds.ActualFrameDuration = 180_000
    ds.RadiopharmaceuticalInformationSequence = [drug]
    for keyword, value in changes.items():
        target = drug if keyword.startswith("Radio") and keyword != "RadiopharmaceuticalInformationSequence" else ds
        if value is None:
            delattr(target, keyword)
        else:
            setattr(target, keyword, value)
    return ds


def test_hand_computed_factor():
    result = suv_bw_factor(header())
    assert result.factor == pytest.approx(HAND_FACTOR, rel=1e-9)
    assert result.attributes["DecayTime"] == "3600 s"
    assert result.attributes["DecayReferenceDateTime"] == "2025-01-01T11:00:00"
    assert result.attributes["Units"] == "BQML"


def test_start_time_without_datetime_uses_series_date():
    result = suv_bw_factor(header(RadiopharmaceuticalStartDateTime=None))
    assert result.factor == pytest.approx(HAND_FACTOR, rel=1e-9)


def test_injection_before_midnight():
    # Injected 23:30 on 1 Jan, scanned 00:30 on 2 Jan: only the time of injection is known.
    ds = header(
        RadiopharmaceuticalStartDateTime=None,
        RadiopharmaceuticalStartTime="233000",
        SeriesDate="20250102",
        AcquisitionDate="20250102",
        SeriesTime="003000",
        AcquisitionTime="003000",
    )
    result = suv_bw_factor(ds)
    assert result.attributes["InjectionDateTime"] == "2025-01-01T23:30:00"
    assert result.factor == pytest.approx(HAND_FACTOR, rel=1e-9)


def test_admin_decay_correction_does_not_decay_the_dose():
    assert suv_bw_factor(header(DecayCorrection="ADMIN")).factor == pytest.approx(70_000 / 3.7e8)


def test_none_decay_correction_uses_mean_activity_time_of_the_frame():
    # Frame 11:00 + 180 s: mean activity at 11:01:29.858, i.e. 89.858 s more decay than START.
    none = suv_bw_factor(header(DecayCorrection="NONE")).factor
    assert none == pytest.approx(HAND_FACTOR * 2 ** (89.858 / 6586.2), rel=1e-7)


def test_dose_in_mbq_is_recognised():
    result = suv_bw_factor(header(RadionuclideTotalDose="370"))
    assert result.factor == pytest.approx(HAND_FACTOR, rel=1e-9)
    assert "MBq" in result.attributes["RadionuclideTotalDose"]


def test_series_time_after_acquisition_uses_acquisition():
    # Series re-written at 11:30 after an acquisition at 11:00, no frame timing: use 11:00.
    ds = header(SeriesTime="113000", ActualFrameDuration=None)
    assert suv_bw_factor(ds).factor == pytest.approx(HAND_FACTOR, rel=1e-9)


@pytest.mark.parametrize(
    "missing",
    [
        "PatientWeight",
        "Units",
        "RadionuclideTotalDose",
        "RadionuclideHalfLife",
        "RadiopharmaceuticalInformationSequence",
        "DecayCorrection",
        "SeriesTime",
    ],
)
def test_missing_attribute_is_named(missing):
    ds = header(RadiopharmaceuticalStartDateTime=None)  # so SeriesDate/Time are needed
    if missing == "RadiopharmaceuticalInformationSequence":
        del ds.RadiopharmaceuticalInformationSequence
    else:
        ds = header(RadiopharmaceuticalStartDateTime=None, **{missing: None})
    with pytest.raises(SuvError) as err:
        suv_bw_factor(ds)
    assert err.value.attribute == missing
    assert missing in str(err.value)


def test_no_injection_time_is_named():
    ds = header(RadiopharmaceuticalStartDateTime=None, RadiopharmaceuticalStartTime=None)
    with pytest.raises(SuvError) as err:
        suv_bw_factor(ds)
    assert err.value.attribute == "RadiopharmaceuticalStartTime"


@pytest.mark.parametrize("weight", ["0", "-70"])
def test_invalid_weight_is_named(weight):
    with pytest.raises(SuvError) as err:
        suv_bw_factor(header(PatientWeight=weight))
    assert err.value.attribute == "PatientWeight"


@pytest.mark.parametrize("units", ["CPS", "PROPCNTS", "NONE"])
def test_units_that_cannot_be_converted_are_named(units):
    with pytest.raises(SuvError) as err:
        suv_bw_factor(header(Units=units))
    assert err.value.attribute == "Units" and units in err.value.reason


def test_admin_decay_correction_with_dose_in_mbq():
    # ADMIN: values decay-corrected to the injection, so the 370 MBq dose is used undecayed.
    result = suv_bw_factor(header(DecayCorrection="ADMIN", RadionuclideTotalDose="370"))
    assert result.factor == pytest.approx(70_000 / 370e6, rel=1e-12)  # 1.8918919e-4
    assert result.attributes["DecayTime"] == "0 s"
    assert "MBq" in result.attributes["RadionuclideTotalDose"]


def test_admin_needs_no_injection_time():
    ds = header(
        DecayCorrection="ADMIN",
        RadiopharmaceuticalStartDateTime=None,
        RadiopharmaceuticalStartTime=None,
    )
    assert suv_bw_factor(ds).factor == pytest.approx(70_000 / 3.7e8, rel=1e-12)


@pytest.mark.parametrize("dose", ["10001", "99999"])
def test_dose_neither_bq_nor_mbq_is_refused(dose):
    # 10 001 - 99 999: under 100 kBq if Bq, over 10 GBq if MBq; neither is a PET injection.
    with pytest.raises(SuvError) as err:
        suv_bw_factor(header(RadionuclideTotalDose=dose))
    assert err.value.attribute == "RadionuclideTotalDose"


@pytest.mark.parametrize("dose, bq", [("10000", 1e10), ("100000", 1e5)])
def test_dose_unit_rule_boundaries(dose, bq):
    assert suv_bw_factor(header(DecayCorrection="ADMIN", RadionuclideTotalDose=dose)).factor == (
        pytest.approx(70_000 / bq, rel=1e-12)
    )


def test_other_radionuclide_half_life():
    # Ga-68 (4057.7 s), 1 h: decayed dose = 3.7e8 * 2^(-3600 / 4057.7) = 2.0004480e8 Bq.
    result = suv_bw_factor(header(RadionuclideHalfLife="4057.7"))
    assert result.factor == pytest.approx(70_000 / (3.7e8 * 2 ** (-3600 / 4057.7)), rel=1e-12)
    assert result.factor == pytest.approx(70_000 / 2.0004480e8, rel=1e-7)


@pytest.mark.parametrize(
    "start", ["20250101120000", "20241230100000"], ids=["after-scan", "more-than-24h"]
)
def test_implausible_decay_time_is_refused(start):
    with pytest.raises(SuvError, match="negative or longer than 24 h") as err:
        suv_bw_factor(header(RadiopharmaceuticalStartDateTime=start))
    assert err.value.attribute == "RadiopharmaceuticalStartDateTime"


def test_series_time_after_acquisition_uses_ge_private_scan_start():
    # Series re-written 11:30, acquisition of this bed 11:05, GE scan start 11:00: 3600 s decay.
    ds = header(SeriesTime="113000", AcquisitionTime="110500")
    ds.private_block(0x0009, "GEMS_PETD_01", create=True).add_new(0x0D, "DT", "20250101110000")
    result = suv_bw_factor(ds)
    assert result.factor == pytest.approx(HAND_FACTOR, rel=1e-9)
    assert result.attributes["DecayReferenceDateTime"] == "2025-01-01T11:00:00"
    assert "(0009,100D)" in result.attributes["DecayReferenceFrom"]


def test_ge_private_scan_start_found_in_whichever_block_its_creator_reserved():
    # Another creator holds block 10, GEMS_PETD_01 block 11: the scan start is (0009,110D), and
    # the (0009,100D) of the other creator (a later time) must not be taken for it.
    ds = header(SeriesTime="113000", AcquisitionTime="110500", ActualFrameDuration=None)
    ds.private_block(0x0009, "OTHER VENDOR", create=True).add_new(0x0D, "DT", "20250101103000")
    ds.private_block(0x0009, "GEMS_PETD_01", create=True).add_new(0x0D, "DT", "20250101110000")
    assert (0x0009, 0x110D) in ds
    result = suv_bw_factor(ds)
    assert result.factor == pytest.approx(HAND_FACTOR, rel=1e-9)
    assert "(0009,110D)" in result.attributes["DecayReferenceFrom"]


def test_ge_private_scan_start_ignored_when_the_series_time_is_valid():
    # Series time 11:00 is not after the acquisition (11:00): the private time is not consulted.
    ds = header()
    ds.private_block(0x0009, "GEMS_PETD_01", create=True).add_new(0x0D, "DT", "20250101103000")
    assert suv_bw_factor(ds).factor == pytest.approx(HAND_FACTOR, rel=1e-9)


def test_ge_private_scan_start_without_creator_needs_manufacturer_ge():
    # Creator stripped (as in the OncoRay DROs): (0009,100D) is used only for a GE series.
    ds = header(SeriesTime="113000", AcquisitionTime="110500", ActualFrameDuration=None)
    ds.add_new((0x0009, 0x100D), "DT", "20250101110000")
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    assert suv_bw_factor(ds).factor == pytest.approx(HAND_FACTOR, rel=1e-9)
    ds.Manufacturer = "SIEMENS"  # falls back to the acquisition, 11:05: 3900 s of decay
    assert suv_bw_factor(ds).factor == pytest.approx(HAND_FACTOR * 2 ** (300 / 6586.2), rel=1e-9)


def test_series_time_after_acquisition_back_computes_from_frame_reference_time():
    # Bed started 11:02:30; its mean activity (Tave = 89.858 s into a 180 s frame) is
    # 239.858 s after the scan start, so the scan started at 11:00:00.
    ds = header(SeriesTime="113000", AcquisitionTime="110230", FrameReferenceTime="239857.9")
    assert suv_bw_factor(ds).factor == pytest.approx(HAND_FACTOR, rel=1e-6)
