#!/usr/bin/env python3
"""Writes small, valid DICOM test instances (pydicom 3) for pacsgate's integration tests.

Usage:
  make_dicom.py small --out DIR --spec JSON
      JSON: [{"patient_id": "P1", "patient_name": "DOE^JANE", "instances": 3}, ...]
      Each entry is one study with one CT series of `instances` images
      (128 x 160, 16-bit, 40 kB of pixel data each).
  make_dicom.py large --out DIR --mb N [--patient-id ID --patient-name NAME]
      One multi-frame grayscale word secondary capture instance with about N MB of pixel data.

Prints one JSON array on stdout: [{"path", "patient_id", "study_uid", "series_uid", "sop_uid",
"sop_class_uid"}, ...]. UIDs are random (2.25.<uuid>), so every call makes new instances;
the pixel data is a deterministic pattern. Files are Explicit VR Little Endian with a proper
file meta information group.
"""

import argparse
import json
import os
import sys
import uuid

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MF_WORD_SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7.3"


def new_uid():
    return "2.25." + str(uuid.uuid4().int)


def pattern(n_bytes, seed):
    """Deterministic, not all-zero pixel bytes (compressible data would hide bugs less well)."""
    block = bytes(((i * 7 + seed * 13) & 0xFF) for i in range(4096))
    reps, rest = divmod(n_bytes, len(block))
    return block * reps + block[:rest]


def base_dataset(sop_class, sop_uid, patient_id, patient_name, study_uid, series_uid):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240115"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC" + patient_id[-8:]
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.StudyDescription = "pacsgate test study"
    ds.SeriesDescription = "pacsgate test series"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def save(ds, out_dir, name):
    path = os.path.join(out_dir, name)
    ds.save_as(path, enforce_file_format=True)
    return path


def record(path, ds):
    return {
        "path": path,
        "patient_id": ds.PatientID,
        "study_uid": ds.StudyInstanceUID,
        "series_uid": ds.SeriesInstanceUID,
        "sop_uid": ds.SOPInstanceUID,
        "sop_class_uid": ds.SOPClassUID,
    }


def make_small(out_dir, spec):
    rows, cols = 128, 160
    out = []
    for entry in spec:
        study_uid, series_uid = new_uid(), new_uid()
        for number in range(1, int(entry["instances"]) + 1):
            sop_uid = new_uid()
            ds = base_dataset(CT_IMAGE_STORAGE, sop_uid, entry["patient_id"],
                              entry["patient_name"], study_uid, series_uid)
            ds.Modality = "CT"
            ds.InstanceNumber = number
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImagePositionPatient = [0.0, 0.0, float(number)]
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.PixelSpacing = [0.5, 0.5]
            ds.SliceThickness = 1.0
            ds.KVP = 120
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.Rows = rows
            ds.Columns = cols
            ds.PixelData = pattern(rows * cols * 2, number)
            out.append(record(save(ds, out_dir, sop_uid + ".dcm"), ds))
    return out


def make_large(out_dir, mb, patient_id, patient_name, study_uid=None):
    rows, cols = 512, 512
    frame_bytes = rows * cols * 2
    frames = max(1, (mb * 1024 * 1024 + frame_bytes - 1) // frame_bytes)
    sop_uid = new_uid()
    ds = base_dataset(MF_WORD_SC_STORAGE, sop_uid, patient_id, patient_name, study_uid or new_uid(), new_uid())
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.Rows = rows
    ds.Columns = cols
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 100.0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelData = pattern(frame_bytes * frames, 1)
    return [record(save(ds, out_dir, sop_uid + ".dcm"), ds)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    small = sub.add_parser("small")
    small.add_argument("--out", required=True)
    small.add_argument("--spec", required=True)
    large = sub.add_parser("large")
    large.add_argument("--out", required=True)
    large.add_argument("--mb", type=int, required=True)
    large.add_argument("--patient-id", default="LARGE1")
    large.add_argument("--patient-name", default="LARGE^PATIENT")
    large.add_argument("--study-uid", help="put the instance into this study (default: a new one)")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    if args.cmd == "small":
        result = make_small(args.out, json.loads(args.spec))
    else:
        result = make_large(args.out, args.mb, args.patient_id, args.patient_name, args.study_uid)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
