//! CNI spec versions: which ones we speak and how they compare.

use std::fmt;
use std::str::FromStr;

use super::error::Error;

/// Every version a caller may ask for, oldest first.
pub const SUPPORTED: [Version; 5] = [
    Version(0, 3, 0),
    Version(0, 3, 1),
    Version(0, 4, 0),
    Version(1, 0, 0),
    Version(1, 1, 0),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u8, pub u8, pub u8);

impl Version {
    pub const V0_4_0: Version = Version(0, 4, 0);
    pub const V1_0_0: Version = Version(1, 0, 0);
    pub const V1_1_0: Version = Version(1, 1, 0);
    pub const LATEST: Version = Version(1, 1, 0);

    pub fn is_supported(self) -> bool {
        SUPPORTED.contains(&self)
    }

    /// Parse a `cniVersion` and insist we speak it (code 1 otherwise).
    pub fn parse_supported(text: &str) -> Result<Version, Error> {
        let version: Version = text.parse().map_err(|_| {
            Error::IncompatibleVersion(format!(
                "cniVersion \"{text}\" is not a version; use one of {}",
                supported_list()
            ))
        })?;
        if !version.is_supported() {
            return Err(Error::IncompatibleVersion(format!(
                "cniVersion {text} is not supported by wg-cni; use one of {}",
                supported_list()
            )));
        }
        Ok(version)
    }
}

pub fn supported_list() -> String {
    SUPPORTED
        .iter()
        .map(Version::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for Version {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.split('.').map(|p| p.parse::<u8>().map_err(|_| ()));
        let version = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c), None) => Version(a?, b?, c?),
            (Some(a), Some(b), None, None) => Version(a?, b?, 0),
            _ => return Err(()),
        };
        Ok(version)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        let v: Version = "0.3.1".parse().unwrap();
        assert_eq!(v, Version(0, 3, 1));
        assert!(v < Version::V0_4_0);
        assert!(Version::V1_0_0 < Version::V1_1_0);
        assert!("1.x.0".parse::<Version>().is_err());
        assert!("1.0.0.0".parse::<Version>().is_err());
    }

    #[test]
    fn unsupported_is_code_1() {
        assert_eq!(Version::parse_supported("0.2.0").unwrap_err().code(), 1);
        assert_eq!(Version::parse_supported("banana").unwrap_err().code(), 1);
        assert_eq!(Version::parse_supported("1.1.0").unwrap(), Version::V1_1_0);
    }
}
