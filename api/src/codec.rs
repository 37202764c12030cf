//! A page codec as the operator and the policy name it: none, lz4, or zstd at a level.
//! How pages are compressed, and a codec's id on the migration stream, are the data
//! path's business.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const ZSTD_MAX_LEVEL: i32 = 19;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    #[default]
    None,
    Lz4,
    /// Level 1..=[`ZSTD_MAX_LEVEL`].
    Zstd(i32),
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CodecParseError {
    #[error("unknown codec {0:?}: use none, lz4 or zstd:N (N from 1 to {ZSTD_MAX_LEVEL})")]
    Unknown(String),
    #[error("zstd level {0} is outside 1..={ZSTD_MAX_LEVEL}")]
    Level(i32),
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::None => f.write_str("none"),
            Codec::Lz4 => f.write_str("lz4"),
            Codec::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

impl FromStr for Codec {
    type Err = CodecParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Codec::None),
            "lz4" => Ok(Codec::Lz4),
            "zstd" => Ok(Codec::Zstd(1)),
            _ => {
                let level = s
                    .strip_prefix("zstd:")
                    .and_then(|l| l.parse::<i32>().ok())
                    .ok_or_else(|| CodecParseError::Unknown(s.to_owned()))?;
                if !(1..=ZSTD_MAX_LEVEL).contains(&level) {
                    return Err(CodecParseError::Level(level));
                }
                Ok(Codec::Zstd(level))
            }
        }
    }
}

// On the wire a codec is its text ("zstd:3"), as an operator writes it.
impl Serialize for Codec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Codec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_bad_names_are_refused() {
        for c in [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(19)] {
            assert_eq!(c.to_string().parse::<Codec>(), Ok(c));
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Codec>(&json).unwrap(), c);
        }
        assert_eq!("zstd".parse::<Codec>(), Ok(Codec::Zstd(1)));
        assert_eq!("zstd:0".parse::<Codec>(), Err(CodecParseError::Level(0)));
        assert_eq!("zstd:20".parse::<Codec>(), Err(CodecParseError::Level(20)));
        assert!(matches!(
            "gzip".parse::<Codec>(),
            Err(CodecParseError::Unknown(_))
        ));
        let e = serde_json::from_str::<Codec>("\"zstd:99\"").unwrap_err();
        assert!(e.to_string().contains("zstd level 99"), "{e}");
    }
}
