//! Certificate renewal: a new certificate for a key that already holds one.
//!
//! A renewal changes the validity and the serial number and nothing else: the same key,
//! the same identity, for the coordinator the same host names. So everything that
//! checks a party by its key (cosignatures on the audit log, the secure-aggregation
//! roster) goes on working across it, and the previous certificate stays valid until it
//! expires. A new key is a different act (`sites approve --replace`), decided by a
//! person.

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
use x509_parser::extensions::GeneralName;

use crate::identity::{self, Ca, IdentityError, PeerId, Role, SecretPem};

/// Site side: a certificate request for `site_id` with the key the site already has
/// (`site.key`), for the coordinator's `RenewCertificate`.
pub fn renewal_request(site_id: &str, key: &SecretPem) -> Result<String, IdentityError> {
    let peer = PeerId::site(site_id)?;
    let pair = KeyPair::from_pem(key.expose()).map_err(|_| IdentityError::BadKey { what: "site key" })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, peer.to_string());
    params.subject_alt_names = vec![identity::uri_san(&peer)?];
    params
        .serialize_request(&pair)
        .and_then(|csr| csr.pem())
        .map_err(|cause| IdentityError::Generate { what: "writing the renewal request", cause })
}

/// The host names and IP addresses a server certificate is valid for, in its order.
pub fn server_hosts(cert_der: &[u8]) -> Result<Vec<String>, IdentityError> {
    let cert = identity::parse_cert(cert_der)?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Parse { what: "certificate subject alternative names", reason: e.to_string() })?;
    let mut hosts = Vec::new();
    for name in sans.iter().flat_map(|ext| &ext.value.general_names) {
        match name {
            GeneralName::DNSName(dns) => hosts.push((*dns).to_string()),
            GeneralName::IPAddress(ip) => {
                let ip = match ip.len() {
                    4 => <[u8; 4]>::try_from(*ip).map(std::net::IpAddr::from).ok(),
                    16 => <[u8; 16]>::try_from(*ip).map(std::net::IpAddr::from).ok(),
                    _ => None,
                };
                let ip = ip.ok_or(IdentityError::Parse {
                    what: "a server certificate's IP address",
                    reason: "neither 4 nor 16 bytes".into(),
                })?;
                hosts.push(ip.to_string());
            }
            _ => {}
        }
    }
    Ok(hosts)
}

impl Ca {
    /// A new certificate for the existing `key` of the coordinator or an operator, valid
    /// `validity_days` from now, for the identity (and a coordinator's hosts) of
    /// `cert_pem`, the certificate it replaces. Refuses a site's certificate (a site asks
    /// with its own request, [`renewal_request`]) and a key that is not `cert_pem`'s.
    pub fn reissue(&self, cert_pem: &str, key: &SecretPem, validity_days: u32) -> Result<String, IdentityError> {
        let der = &identity::leaf_der(cert_pem)?;
        let peer = PeerId::from_cert_der(der)?;
        let (sans, usage) = match peer.role {
            Role::Coordinator => {
                let hosts = server_hosts(der)?;
                if hosts.is_empty() {
                    return Err(IdentityError::NoHosts);
                }
                let sans = hosts.iter().map(|h| identity::host_san(h)).collect::<Result<Vec<SanType>, _>>()?;
                (sans, ExtendedKeyUsagePurpose::ServerAuth)
            }
            Role::Operator => (Vec::new(), ExtendedKeyUsagePurpose::ClientAuth),
            Role::Site => {
                return Err(IdentityError::RequestRefused {
                    reason: format!("{peer}: a site renews with its own request"),
                });
            }
        };
        if !identity::key_matches_cert(key, der)? {
            return Err(IdentityError::BadKey { what: "key (it does not match the certificate)" });
        }
        let params = identity::leaf_params(&peer, sans, usage, validity_days)?;
        let pair = KeyPair::from_pem(key.expose()).map_err(|_| IdentityError::BadKey { what: "key" })?;
        let cert = params
            .signed_by(&pair, &self.issuer)
            .map_err(|cause| IdentityError::Generate { what: "signing the renewed certificate", cause })?;
        Ok(cert.pem())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::identity::{fingerprint, not_after_unix, pem_to_der, same_public_key, site_request};

    fn der(pem: &str) -> Vec<u8> {
        pem_to_der(pem).unwrap().remove(0).to_vec()
    }

    #[test]
    fn a_renewed_site_certificate_keeps_the_key_and_identity_and_lasts_longer() {
        let ca = Ca::generate("heart", 3650).unwrap();
        let (key, csr) = site_request("hospital-a").unwrap();
        let (_, short) = ca.sign_site_request(&csr, Some("hospital-a"), 20).unwrap();
        let renewal = renewal_request("hospital-a", &key).unwrap();
        let (peer, long) = ca.sign_site_request(&renewal, Some("hospital-a"), 397).unwrap();
        assert_eq!(peer, PeerId::site("hospital-a").unwrap());
        assert!(same_public_key(&der(&short), &der(&long)).unwrap());
        assert!(identity::key_matches_cert(&key, &der(&long)).unwrap());
        assert_ne!(fingerprint(&der(&short)), fingerprint(&der(&long)));
        let gained = not_after_unix(&der(&long)).unwrap() - not_after_unix(&der(&short)).unwrap();
        assert!((376 * 86_400..=378 * 86_400).contains(&gained), "{gained}");
        // A request for another site with this key is refused where a site is expected.
        let other = renewal_request("hospital-b", &key).unwrap();
        assert!(matches!(ca.sign_site_request(&other, Some("hospital-a"), 397), Err(IdentityError::WrongSite { .. })));
    }

    #[test]
    fn a_reissued_server_or_operator_certificate_keeps_its_hosts_identity_and_key() {
        let ca = Ca::generate("heart", 3650).unwrap();
        let hosts = ["coord.example.org".to_owned(), "10.0.0.7".to_owned(), "::1".to_owned()];
        let server = ca.issue_server("heart", &hosts, 20).unwrap();
        let renewed = ca.reissue(&server.cert_pem, &server.key, 397).unwrap();
        let (old, new) = (der(&server.cert_pem), der(&renewed));
        assert_eq!(server_hosts(&new).unwrap(), hosts);
        assert_eq!(PeerId::from_cert_der(&new).unwrap(), PeerId::coordinator("heart").unwrap());
        assert!(same_public_key(&old, &new).unwrap());
        assert!(not_after_unix(&new).unwrap() > not_after_unix(&old).unwrap() + 370 * 86_400);
        // Another key, or a certificate that is not a coordinator's, is refused.
        let other = ca.issue_server("heart", &hosts, 20).unwrap();
        assert!(matches!(ca.reissue(&server.cert_pem, &other.key, 397), Err(IdentityError::BadKey { .. })));
        // An operator keeps its name and key; a site is refused (it sends a request).
        let operator = ca.issue_operator("lead", 20).unwrap();
        let renewed = ca.reissue(&operator.cert_pem, &operator.key, 397).unwrap();
        assert_eq!(PeerId::from_cert_der(&der(&renewed)).unwrap(), PeerId::operator("lead").unwrap());
        assert!(same_public_key(&der(&operator.cert_pem), &der(&renewed)).unwrap());
        let (key, csr) = site_request("a").unwrap();
        let (_, site) = ca.sign_site_request(&csr, Some("a"), 20).unwrap();
        let refused = ca.reissue(&site, &key, 397).unwrap_err();
        assert!(refused.to_string().contains("a site renews with its own request"), "{refused}");
    }
}
