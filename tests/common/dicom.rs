//! Writing small DICOM files for tests (the decoder is `lvlm_ift::data::dicom`).

use std::path::Path;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

pub enum Pixels {
    U16(Vec<u16>),
    I16(Vec<i16>),
}

/// Writes a 16-bit single-frame DICOM (explicit VR little endian) with the given attributes.
pub fn write_dcm(
    path: &Path,
    (cols, rows): (u16, u16),
    pixels: Pixels,
    photometric: &str,
    extra: &[(Tag, &str)],
) {
    let mut obj = InMemDicomObject::new_empty();
    let us = |t: Tag, v: u16| DataElement::new(t, VR::US, PrimitiveValue::from(v));
    obj.put(DataElement::new(
        tags::SOP_CLASS_UID,
        VR::UI,
        PrimitiveValue::from(uids::SECONDARY_CAPTURE_IMAGE_STORAGE),
    ));
    obj.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from("1.2.826.0.1.3680043.2.1125.1"),
    ));
    obj.put(us(tags::ROWS, rows));
    obj.put(us(tags::COLUMNS, cols));
    obj.put(us(tags::SAMPLES_PER_PIXEL, 1));
    obj.put(us(tags::BITS_ALLOCATED, 16));
    obj.put(us(tags::BITS_STORED, 16));
    obj.put(us(tags::HIGH_BIT, 15));
    obj.put(DataElement::new(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        PrimitiveValue::from(photometric),
    ));
    let (repr, value) = match pixels {
        Pixels::U16(v) => (0, PrimitiveValue::U16(v.into())),
        Pixels::I16(v) => (1, PrimitiveValue::I16(v.into())),
    };
    obj.put(us(tags::PIXEL_REPRESENTATION, repr));
    for (tag, v) in extra {
        obj.put(DataElement::new(*tag, VR::DS, PrimitiveValue::from(*v)));
    }
    obj.put(DataElement::new(tags::PIXEL_DATA, VR::OW, value));
    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .unwrap();
    file.write_to_file(path).unwrap();
}
