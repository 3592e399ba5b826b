//! [`Secret`]: the one type that holds credentials (the mesh key, API tokens, the git token,
//! and later chat tokens). It never prints its value (`Debug` and `Display` show
//! `[redacted]`), wipes it from memory when dropped, and has no `Serialize`: code that must
//! store or send a secret calls [`Secret::expose`] at that one place.

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroize;

/// A credential that does not print and is zeroed on drop.
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Secret<T> {
    /// Wrap a value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The value, for the one place that has to use it.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// The value, to fill it in place (e.g. with random bytes) without a copy.
    pub fn expose_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize + Clone> Clone for Secret<T> {
    fn clone(&self) -> Self {
        Secret(self.0.clone())
    }
}

impl<T: Zeroize + PartialEq> PartialEq for Secret<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<T: Zeroize + Eq> Eq for Secret<T> {}

impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl<T: Zeroize> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl FromStr for Secret<String> {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Secret(text.to_string()))
    }
}

impl From<String> for Secret<String> {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let token = Secret::new("ghp_very_secret".to_string());
        assert_eq!(format!("{token}"), "[redacted]");
        assert_eq!(format!("{token:?}"), "Secret([redacted])");
        assert_eq!(
            format!("{:?}", Some(token.clone())),
            "Some(Secret([redacted]))"
        );
        assert_eq!(token.expose(), "ghp_very_secret");
        let key = Secret::new([7u8; 32]);
        assert!(!format!("{key:?}").contains('7'));
    }
}
