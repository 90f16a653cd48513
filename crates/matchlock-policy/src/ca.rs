//! The per-sandbox MITM certificate authority: an ECDSA P-256 CA generated when the sandbox starts
//! (its key lives only in the supervisor's memory), and leaf certificates per SNI, issued on demand
//! and cached. The CA certificate (never the key) is what the guest's trust store receives.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use std::collections::HashMap;
use std::sync::PoisonError;
use std::sync::{Arc, Mutex};

/// Leaf certificates kept per CA; the cache is cleared when full (a guest cycling through names
/// cannot grow it without bound).
const MAX_LEAVES: usize = 1024;

/// Errors issuing certificates.
#[derive(Debug, thiserror::Error)]
#[error("certificate authority: {0}")]
pub struct CaError(String);

/// A leaf certificate and its private key (DER, PKCS#8).
pub struct Leaf {
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The CA certificate, DER (sent as the chain's second element).
    pub ca_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("cert_der", &self.cert_der.len())
            .finish_non_exhaustive()
    }
}

/// One sandbox's CA.
pub struct MitmCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
    leaves: Mutex<HashMap<String, Arc<Leaf>>>,
}

impl std::fmt::Debug for MitmCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MitmCa").finish_non_exhaustive()
    }
}

fn err(e: impl std::fmt::Display) -> CaError {
    CaError(e.to_string())
}

impl MitmCa {
    /// A fresh CA named after the sandbox.
    pub fn generate(sandbox_id: &str) -> Result<MitmCa, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("Matchlock sandbox {sandbox_id} CA"),
        );
        dn.push(DnType::OrganizationName, "Matchlock");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // Valid from a day ago (guest clocks drift) for a year: sandboxes are short-lived.
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
        params.not_after = (now + std::time::Duration::from_secs(365 * 86_400)).into();
        let cert = params.self_signed(&key).map_err(err)?;
        Ok(MitmCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate in PEM, for the guest's trust store.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// A leaf for `host` (a DNS name or an IP address), issued once and cached.
    pub fn leaf(&self, host: &str) -> Result<Arc<Leaf>, CaError> {
        let host = crate::hosts::normalize(host);
        let valid = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
        if !valid {
            return Err(CaError(format!("'{host}' is not a host name")));
        }
        if let Some(l) = self
            .leaves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&host)
        {
            return Ok(l.clone());
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.clone().try_into().map_err(err)?),
        };
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.clone());
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
        params.not_after = (now + std::time::Duration::from_secs(90 * 86_400)).into();
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let leaf = Arc::new(Leaf {
            cert_der: cert.der().to_vec(),
            ca_der: self.cert_der.clone(),
            key_der: key.serialize_der(),
        });
        let mut cache = self.leaves.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_LEAVES {
            cache.clear();
        }
        cache.insert(host, leaf.clone());
        Ok(leaf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_and_caches_leaves() {
        let ca = MitmCa::generate("vm-1234abcd").unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let a = ca.leaf("API.example.com.").unwrap();
        let b = ca.leaf("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let ip = ca.leaf("10.0.0.1").unwrap();
        assert_ne!(ip.cert_der, a.cert_der);
        assert_eq!(a.ca_der, ca.cert_der());
        // Two sandboxes never share a CA.
        assert_ne!(MitmCa::generate("vm-2").unwrap().cert_der(), ca.cert_der());
        assert!(ca.leaf("bad host!").is_err());
    }
}
