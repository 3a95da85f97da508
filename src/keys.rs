//! Per-pod x25519 key pairs from the OS RNG. The private half never leaves this type except
//! into the WireGuard device, and it is wiped from memory when dropped.

use std::fmt;

use wireguard_control::Key;
use x25519_dalek::{PublicKey, StaticSecret};

pub struct KeyPair {
    secret: StaticSecret,
    public: Key,
}

impl KeyPair {
    pub fn generate() -> KeyPair {
        let secret = StaticSecret::random();
        let public = Key(PublicKey::from(&secret).to_bytes());
        KeyPair { secret, public }
    }

    pub fn public(&self) -> &Key {
        &self.public
    }

    /// The private key bytes, for the one call that hands them to the device.
    pub fn secret_bytes(&self) -> &[u8; 32] {
        self.secret.as_bytes()
    }
}

/// Never print the private key, even by accident in a debug log.
impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public.to_base64())
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_and_public_matches_wg() {
        let a = KeyPair::generate();
        let b = KeyPair::generate();
        assert_ne!(a.public(), b.public());
        // wireguard-control's own derivation agrees with x25519-dalek's.
        let private = Key(*a.secret_bytes());
        assert_eq!(&private.get_public(), a.public());
        assert!(!format!("{a:?}").contains(&private.to_base64()));
    }
}
