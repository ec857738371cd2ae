//! SchemaVer (`MODEL-REVISION-ADDITION`, Snowplow's): MODEL for changes that break every
//! historical event, REVISION for changes that may break some, ADDITION for changes that break
//! none.

use std::fmt;

/// A parsed SchemaVer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct SchemaVer {
    /// Breaks all historical data.
    pub model: u32,
    /// May break some historical data.
    pub revision: u32,
    /// Breaks none.
    pub addition: u32,
}

impl SchemaVer {
    /// Parses `1-0-0`.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('-').map(|p| p.parse::<u32>().ok());
        let version = Self {
            model: parts.next()??,
            revision: parts.next()??,
            addition: parts.next()??,
        };
        (parts.next().is_none() && version.model >= 1).then_some(version)
    }
}

impl fmt::Display for SchemaVer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.model, self.revision, self.addition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        let a = SchemaVer::parse("1-0-2").unwrap();
        let b = SchemaVer::parse("1-1-0").unwrap();
        assert!(a < b);
        assert_eq!(a.to_string(), "1-0-2");
        assert!(SchemaVer::parse("1.0.0").is_none());
        assert!(SchemaVer::parse("0-1-0").is_none());
        assert!(SchemaVer::parse("1-0").is_none());
    }
}
