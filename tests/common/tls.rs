//! TLS for the tests: a throwaway CA and server certificate made in Rust (rcgen, so a
//! clean machine needs no `openssl` CLI), and a private `redis-server` listening on a
//! TLS port beside its plain one.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};

use super::{free_port, PrivateRedis};

/// A CA, a server certificate it signed (for `localhost` and `127.0.0.1`) and a
/// client certificate, as PEM; the CA and server's also in files for `redis-server`. The files go when this is dropped.
pub struct TestPki {
    /// The CA certificate, PEM: what a client must trust.
    pub ca_pem: String,
    /// A client certificate the CA signed, and its key (PEM), for mutual TLS.
    pub client_cert_pem: String,
    pub client_key_pem: String,
    pub dir: PathBuf,
}

impl TestPki {
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "task-semaphore test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "task-semaphore test redis");
        let server = params.signed_by(&server_key, &ca).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "task-semaphore test client");
        let client = params.signed_by(&client_key, &ca).unwrap();

        let dir = std::env::temp_dir().join(super::unique_name("task-semaphore-pki"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(dir.join("redis.crt"), server.pem()).unwrap();
        std::fs::write(dir.join("redis.key"), server_key.serialize_pem()).unwrap();
        TestPki {
            ca_pem: ca.pem(),
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
            dir,
        }
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private redis-server with a TLS port (server certificate from `pki`; clients are
/// asked for one only if `extra` says `--tls-auth-clients yes`) beside its plain port (kept for the test's own admin
/// connection). `None` when there is no redis-server binary.
pub struct TlsRedis {
    pub server: PrivateRedis,
    pub tls_port: u16,
}

impl TlsRedis {
    pub fn start(pki: &TestPki, extra: &[&str]) -> Option<Self> {
        let tls_port = free_port().to_string();
        let (cert, key, ca) = (pki.file("redis.crt"), pki.file("redis.key"), pki.file("ca.crt"));
        let mut args = vec![
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ];
        args.extend_from_slice(extra);
        let server = PrivateRedis::start(&args)?;
        Some(TlsRedis {
            server,
            tls_port: tls_port.parse().unwrap(),
        })
    }

    /// `rediss://` on the TLS port, host `host` (which the certificate must name).
    pub fn tls_url(&self, host: &str) -> String {
        format!("rediss://{host}:{}", self.tls_port)
    }
}
