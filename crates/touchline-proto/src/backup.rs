//! The backup file (`proto/touchline/v1/backup.proto`): `BackupFrame`s, each preceded by its
//! length as a varint. [`FrameWriter`] makes the bytes (the node's `AdminService.Backup`);
//! [`FrameReader`] reads them back, checking their order, their sizes and the file's checksum
//! (`touchline backup` checks the file it wrote, `touchline restore` reads it).

use std::io::Read;

use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::v1::backup_frame::Frame;
use crate::v1::{BackupFrame, BackupTrailer};

/// The format a backup file's header names.
pub const FORMAT: &str = "touchline-backup/1";

/// The largest frame a reader accepts. An events frame ends once its records pass
/// [`EVENTS_FRAME_BYTES`], so a frame is at most that plus one record, and a record is at most
/// what the projector's consumer takes (librdkafka's `receive.message.max.bytes`, 100 MB by
/// default; raised above this, a backup holding such a record is refused by its reader).
pub const MAX_FRAME_BYTES: usize = 128 * 1024 * 1024;

/// An events frame ends once its records hold this many bytes.
pub const EVENTS_FRAME_BYTES: usize = 1024 * 1024;

/// The most memory a frame may take once decoded (its bytes and one structure per event), so that
/// a hostile file cannot make a reader allocate many times its frames' sizes.
pub const MAX_DECODED_FRAME_BYTES: usize = 2 * MAX_FRAME_BYTES;

/// Estimates the memory an encoded `BackupFrame` takes once decoded: its bytes, plus a
/// `LoggedEvent` per event of an events frame. A group (no backup message has one) makes it
/// `usize::MAX`.
fn decoded_size(bytes: &[u8]) -> usize {
    use crate::codec::{Field, fields};
    let mut estimate = bytes.len();
    for field in fields(bytes) {
        match field {
            Field::Group => return usize::MAX,
            // BackupFrame.events
            Field::Delimited { number: 5, payload } => {
                for field in fields(payload) {
                    match field {
                        Field::Group => return usize::MAX,
                        // BackupEvents.events
                        Field::Delimited { number: 2, .. } => {
                            estimate = estimate
                                .saturating_add(std::mem::size_of::<crate::v1::LoggedEvent>());
                        }
                        Field::Delimited { .. } | Field::Scalar => {}
                    }
                }
            }
            Field::Delimited { .. } | Field::Scalar => {}
        }
    }
    estimate
}

/// Encodes frames, keeping the checksum of everything written for the trailer.
#[derive(Debug, Default)]
pub struct FrameWriter {
    hasher: Sha256,
}

impl FrameWriter {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes of one frame (its length, then the frame).
    #[must_use]
    pub fn frame(&mut self, frame: Frame) -> Vec<u8> {
        let bytes = BackupFrame { frame: Some(frame) }.encode_length_delimited_to_vec();
        self.hasher.update(&bytes);
        bytes
    }

    /// The bytes of the trailer, the file's last frame: the checksum of everything before it.
    #[must_use]
    pub fn trailer(self, events: u64, log_sha256: String) -> Vec<u8> {
        BackupFrame {
            frame: Some(Frame::Trailer(BackupTrailer {
                events,
                log_sha256,
                file_sha256: hex::encode(self.hasher.finalize()),
            })),
        }
        .encode_length_delimited_to_vec()
    }
}

/// Why a backup file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BackupFileError {
    #[error("cannot read the backup file: {0}")]
    Io(#[from] std::io::Error),
    #[error("the backup file ends in the middle of frame {frame} (byte {offset}): it is truncated")]
    Truncated { frame: u64, offset: u64 },
    #[error("the backup file ends without its trailer (after {frames} frames): it is truncated")]
    NoTrailer { frames: u64 },
    #[error(
        "frame {frame} (byte {offset}) says it is {length} bytes, more than a backup frame may be \
         ({MAX_FRAME_BYTES}): the file is damaged or not a Touchline backup"
    )]
    FrameTooLarge {
        frame: u64,
        offset: u64,
        length: u64,
    },
    #[error(
        "frame {frame} (byte {offset}) is not a backup frame ({reason}): the file is damaged or not a Touchline backup"
    )]
    Malformed {
        frame: u64,
        offset: u64,
        reason: String,
    },
    #[error("frame {frame} (byte {offset}): {problem}")]
    OutOfOrder {
        frame: u64,
        offset: u64,
        problem: String,
    },
    #[error(
        "not a Touchline backup of a format this Touchline reads: {found:?} (expected {FORMAT:?})"
    )]
    Format { found: String },
    #[error(
        "the backup file's checksum ({computed}) is not the one its trailer holds ({stated}): the \
         file is damaged"
    )]
    Checksum { computed: String, stated: String },
    #[error("the backup file goes on after its trailer (byte {offset}): it is damaged")]
    AfterTrailer { offset: u64 },
}

/// The place of each kind of frame in a file: frames come in this order.
fn rank(frame: &Frame) -> u8 {
    match frame {
        Frame::Header(_) => 0,
        Frame::Position(_) => 1,
        Frame::DeadLetteredRecord(_) => 2,
        Frame::DeadLetter(_) => 3,
        Frame::Events(_) => 4,
        Frame::Trailer(_) => 5,
    }
}

fn kind(frame: &Frame) -> &'static str {
    match frame {
        Frame::Header(_) => "a header",
        Frame::Position(_) => "a position",
        Frame::DeadLetteredRecord(_) => "a dead-lettered record",
        Frame::DeadLetter(_) => "a dead letter",
        Frame::Events(_) => "events",
        Frame::Trailer(_) => "a trailer",
    }
}

/// Reads a backup file's frames in order, checking that they come in the order of the format,
/// that the header names [`FORMAT`], and, at the trailer, the file's checksum and that nothing
/// follows it.
#[derive(Debug)]
pub struct FrameReader<R> {
    reader: R,
    hasher: Sha256,
    offset: u64,
    frames: u64,
    /// The rank of the last frame read.
    last: Option<u8>,
}

impl<R: Read> FrameReader<R> {
    /// A reader of the file `reader` reads (buffer it).
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            hasher: Sha256::new(),
            offset: 0,
            frames: 0,
            last: None,
        }
    }

    /// Bytes read so far.
    #[must_use]
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads one byte; `None` at the end of the file.
    fn byte(&mut self) -> Result<Option<u8>, BackupFileError> {
        let mut byte = [0_u8];
        loop {
            match self.reader.read(&mut byte) {
                Ok(0) => return Ok(None),
                Ok(_) => return Ok(Some(byte[0])),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// The next frame, or `None` once the trailer has been read and checked.
    ///
    /// # Errors
    /// When the file cannot be read, is truncated or damaged, or is not a backup this Touchline
    /// reads.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, BackupFileError> {
        let start = self.offset;
        let frame = self.frames + 1;
        if self.last == Some(5) {
            return match self.byte()? {
                None => Ok(None),
                Some(_) => Err(BackupFileError::AfterTrailer { offset: start }),
            };
        }
        // The checksum in the trailer covers the bytes before the trailer's length.
        let before = self.hasher.clone();
        let mut length: u64 = 0;
        let mut prefix = Vec::with_capacity(10);
        loop {
            let Some(byte) = self.byte()? else {
                return Err(if prefix.is_empty() {
                    BackupFileError::NoTrailer {
                        frames: self.frames,
                    }
                } else {
                    BackupFileError::Truncated {
                        frame,
                        offset: start,
                    }
                });
            };
            prefix.push(byte);
            length |= u64::from(byte & 0x7f) << (7 * (prefix.len() - 1));
            if byte & 0x80 == 0 {
                break;
            }
            if prefix.len() == 10 {
                return Err(BackupFileError::Malformed {
                    frame,
                    offset: start,
                    reason: "its length is not a varint".to_owned(),
                });
            }
        }
        let size = usize::try_from(length)
            .ok()
            .filter(|size| *size <= MAX_FRAME_BYTES)
            .ok_or(BackupFileError::FrameTooLarge {
                frame,
                offset: start,
                length,
            })?;
        let mut body = vec![0_u8; size];
        self.reader.read_exact(&mut body).map_err(|error| {
            if error.kind() == std::io::ErrorKind::UnexpectedEof {
                BackupFileError::Truncated {
                    frame,
                    offset: start,
                }
            } else {
                error.into()
            }
        })?;
        self.hasher.update(&prefix);
        self.hasher.update(&body);
        self.offset += (prefix.len() + size) as u64;
        self.frames = frame;
        let malformed = |reason: String| BackupFileError::Malformed {
            frame,
            offset: start,
            reason,
        };
        // Small entries decode to larger structures: a frame of empty events would take many
        // times its size once decoded. Estimated before decoding, and refused past a bound.
        let estimate = decoded_size(&body);
        if estimate > MAX_DECODED_FRAME_BYTES {
            return Err(malformed(format!(
                "it would take about {estimate} bytes once decoded, more than a backup frame may \
                 ({MAX_DECODED_FRAME_BYTES})"
            )));
        }
        let decoded = BackupFrame::decode(body.as_slice())
            .map_err(|error| malformed(error.to_string()))?
            .frame
            .ok_or_else(|| malformed("it holds nothing".to_owned()))?;
        let out_of_order = |problem: String| BackupFileError::OutOfOrder {
            frame,
            offset: start,
            problem,
        };
        let rank = rank(&decoded);
        match self.last {
            None if rank != 0 => {
                return Err(out_of_order(format!(
                    "the file starts with {} instead of a header: not a Touchline backup",
                    kind(&decoded)
                )));
            }
            Some(last) if rank < last || rank == 0 => {
                return Err(out_of_order(format!(
                    "{} after the frames it must precede",
                    kind(&decoded)
                )));
            }
            _ => {}
        }
        self.last = Some(rank);
        match &decoded {
            Frame::Header(header) if header.format != FORMAT => {
                return Err(BackupFileError::Format {
                    found: header.format.clone(),
                });
            }
            Frame::Trailer(trailer) => {
                let computed = hex::encode(before.finalize());
                if computed != trailer.file_sha256 {
                    return Err(BackupFileError::Checksum {
                        computed,
                        stated: trailer.file_sha256.clone(),
                    });
                }
            }
            _ => {}
        }
        Ok(Some(decoded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{BackupEvents, BackupHeader, BackupPosition, LoggedEvent};

    fn file() -> Vec<u8> {
        let mut writer = FrameWriter::new();
        let mut bytes = writer.frame(Frame::Header(BackupHeader {
            format: FORMAT.to_owned(),
            events: 2,
            ..Default::default()
        }));
        bytes.extend(writer.frame(Frame::Position(BackupPosition {
            stream: "cluster/topic".to_owned(),
            partition: 0,
            next_offset: 2,
            last_fingerprint: 7,
        })));
        bytes.extend(writer.frame(Frame::Events(BackupEvents {
            first_sequence: 1,
            events: vec![
                LoggedEvent {
                    partition: 0,
                    offset: 0,
                    record: vec![1; 300],
                },
                LoggedEvent {
                    partition: 0,
                    offset: 1,
                    record: vec![2; 10],
                },
            ],
        })));
        bytes.extend(writer.trailer(2, "log".to_owned()));
        bytes
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Frame>, BackupFileError> {
        let mut reader = FrameReader::new(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = reader.next_frame()? {
            frames.push(frame);
        }
        Ok(frames)
    }

    #[test]
    fn a_written_file_reads_back_frame_for_frame() {
        let frames = read_all(&file()).expect("reads");
        assert_eq!(frames.len(), 4);
        assert!(matches!(&frames[2], Frame::Events(events) if events.events.len() == 2));
        assert!(matches!(&frames[3], Frame::Trailer(trailer) if trailer.events == 2));
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = file();
        for end in 0..bytes.len() {
            let error = read_all(&bytes[..end]).expect_err("a truncated file is refused");
            assert!(
                matches!(
                    error,
                    BackupFileError::Truncated { .. } | BackupFileError::NoTrailer { .. }
                ),
                "cut at {end}: {error}"
            );
        }
    }

    #[test]
    fn a_changed_byte_is_refused() {
        let bytes = file();
        // Every byte of the events' records: the checksum finds them.
        for index in 40..300 {
            let mut damaged = bytes.clone();
            damaged[index] ^= 0x20;
            assert!(read_all(&damaged).is_err(), "byte {index} changed");
        }
    }

    #[test]
    fn bytes_after_the_trailer_another_format_and_disorder_are_refused() {
        let mut longer = file();
        longer.push(0);
        assert!(matches!(
            read_all(&longer),
            Err(BackupFileError::AfterTrailer { .. })
        ));

        let mut writer = FrameWriter::new();
        let other = writer.frame(Frame::Header(BackupHeader {
            format: "touchline-backup/9".to_owned(),
            ..Default::default()
        }));
        assert!(matches!(
            read_all(&other),
            Err(BackupFileError::Format { .. })
        ));

        let mut writer = FrameWriter::new();
        let mut disordered = writer.frame(Frame::Header(BackupHeader {
            format: FORMAT.to_owned(),
            ..Default::default()
        }));
        disordered.extend(writer.frame(Frame::Events(BackupEvents::default())));
        disordered.extend(writer.frame(Frame::Position(BackupPosition::default())));
        assert!(matches!(
            read_all(&disordered),
            Err(BackupFileError::OutOfOrder { .. })
        ));

        assert!(matches!(
            read_all(b"\xff\xff\xff\xff\x0f"),
            Err(BackupFileError::FrameTooLarge { .. })
        ));
        // A frame of many empty events (each 2 bytes, each a structure once decoded): refused
        // before it is decoded.
        let empty_events = 8 * 1024 * 1024;
        let mut events = Vec::with_capacity(2 * empty_events);
        for _ in 0..empty_events {
            events.extend_from_slice(&[0x12, 0x00]); // BackupEvents.events, empty
        }
        let mut body = vec![0x2a]; // BackupFrame.events
        prost::encoding::encode_varint(events.len() as u64, &mut body);
        body.extend_from_slice(&events);
        assert!(decoded_size(&body) > MAX_DECODED_FRAME_BYTES);
        let mut writer = FrameWriter::new();
        let mut hostile = writer.frame(Frame::Header(BackupHeader {
            format: FORMAT.to_owned(),
            ..Default::default()
        }));
        prost::encoding::encode_varint(body.len() as u64, &mut hostile);
        hostile.extend_from_slice(&body);
        let error = read_all(&hostile).expect_err("refused");
        assert!(error.to_string().contains("once decoded"), "{error}");

        assert!(matches!(
            read_all(b"not a backup at all"),
            Err(BackupFileError::Malformed { .. } | BackupFileError::Truncated { .. })
        ));
    }
}
