//! Certificates made at test time (rcgen) for the TLS tests: a CA per
//! name, with a server and a client certificate it signed, as PEM files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use chaos_tests::relay::Relay;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA and what it signed, as PEM files in `dir`.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf certificate and key (PEM) signed by `issuer`.
pub fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    purpose: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let mut p = CertificateParams::new(names).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![purpose];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

pub fn pki(dir: &Path, name: &str) -> (Pki, CertifiedIssuer<'static, KeyPair>) {
    let issuer = ca(name);
    let (sc, sk) = leaf(&issuer, "walrelay", ExtendedKeyUsagePurpose::ServerAuth);
    let (cc, ck) = leaf(&issuer, "sender", ExtendedKeyUsagePurpose::ClientAuth);
    let write = |file: &str, text: &str| {
        let p = dir.join(format!("{name}-{file}"));
        std::fs::write(&p, text).unwrap();
        p
    };
    let pki = Pki {
        ca: write("ca.pem", &issuer.pem()),
        server_cert: write("server.pem", &sc),
        server_key: write("server-key.pem", &sk),
        client_cert: write("client.pem", &cc),
        client_key: write("client-key.pem", &ck),
    };
    (pki, issuer)
}

/// `walrelay serve` flags to serve TLS with `p`'s server certificate.
pub fn tls_args(p: &Pki) -> Vec<String> {
    vec![
        "--tls-cert-file".into(),
        p.server_cert.display().to_string(),
        "--tls-key-file".into(),
        p.server_key.display().to_string(),
    ]
}

/// The write URL of a relay serving TLS.
pub fn https_write_url(r: &Relay) -> String {
    format!("https://127.0.0.1:{}/api/v1/write", r.port())
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
