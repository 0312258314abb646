//! The identity registry: devices (with their keys and twins) and service policies
//! (with their keys and rights), kept in one JSON file in the data folder.
//!
//! Every change is written atomically (a temporary file in the same folder, then a
//! rename), so a crash never leaves half a registry. Before every read or change the
//! file is read again if it changed on disk (its inode, mtime or length), so that hub
//! instances sharing one folder (and the CLI's `device add`) see each other's changes.
//! A change holds an exclusive advisory lock on `registry.json.lock` beside the file
//! (`flock`) from reading the file to renaming the new one in, so two processes
//! changing the registry at once take turns and neither loses the other's change.
//! Reads take no lock: the rename makes every read see a whole file, old or new.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use edge_proto::iothub::generate_key;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The registry file's name in the data folder.
pub const FILE: &str = "registry.json";

/// The lock file beside it, held while a change is read, made and written.
pub const LOCK_FILE: &str = "registry.json.lock";

/// How long [`Registry::generation`] trusts the file not to have changed on disk
/// without looking: a policy edited in the file by hand, or by another instance,
/// takes effect within it. Every service call asks for the generation; without this
/// each one would `stat` the file.
pub const RECHECK: Duration = Duration::from_secs(1);

/// What a service policy may do, as IoT Hub's permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Right {
    /// Read devices and twins.
    RegistryRead,
    /// Create, change and delete devices.
    RegistryWrite,
    /// Call methods, read twins (the service side).
    ServiceConnect,
    /// Connect as any device (the device side).
    DeviceConnect,
}

/// A shared access policy: a named pair of keys with rights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// Its name, such as `iothubowner` (the token's `skn`).
    pub name: String,
    /// The primary key, base64.
    pub primary_key: String,
    /// The secondary key, base64.
    pub secondary_key: String,
    /// What it may do.
    pub rights: Vec<Right>,
}

/// A device identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    /// The primary symmetric key, base64.
    pub primary_key: String,
    /// The secondary symmetric key, base64.
    pub secondary_key: String,
    /// `enabled` or `disabled`; a disabled device cannot connect.
    pub status: String,
    /// Changes whenever the identity changes (IoT Hub's `etag`).
    pub etag: String,
    /// Set when the device is created; a device deleted and added again gets another.
    pub generation_id: String,
    /// The device twin's properties.
    #[serde(default)]
    pub twin: Twin,
    /// Thumbprints (SHA-256 or SHA-1, hex) of the self-signed client certificates the
    /// device may connect with instead of a SAS token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub x509_thumbprints: Vec<String>,
    /// Whether the device may connect with a client certificate whose CN is its id,
    /// signed by one of the registry's CA certificates (IoT Hub's `certificateAuthority`
    /// authentication).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub x509_ca: bool,
}

/// What a `PUT /devices/{id}` sets: what is `None` is kept, or for a new device takes
/// its default (keys generated, enabled, no certificates).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeviceChange {
    /// The primary and secondary keys.
    pub keys: (Option<String>, Option<String>),
    /// `enabled` or `disabled`.
    pub status: Option<String>,
    /// The thumbprints of the self-signed certificates it may connect with.
    pub thumbprints: Option<Vec<String>>,
    /// Whether it may connect with a certificate a registered CA signed.
    pub x509_ca: Option<bool>,
}

/// A CA certificate the registry trusts to sign device certificates, as IoT Hub's
/// verified CA certificates (`az iot hub certificate create --verified`): whoever can
/// write the registry is trusted to have checked that the CA is theirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaCertificate {
    /// Its name in the registry.
    pub name: String,
    /// The certificate, PEM.
    pub pem: String,
    /// Its SHA-256 thumbprint, upper-case hex.
    pub thumbprint: String,
    /// Its subject, for people.
    pub subject: String,
}

/// A device twin's two property sets, each versioned.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Twin {
    /// Desired properties (set by the service).
    pub desired: Map<String, Value>,
    /// Its version, raised by every change.
    pub desired_version: u64,
    /// Reported properties (set by the device).
    pub reported: Map<String, Value>,
    /// Its version, raised by every change.
    pub reported_version: u64,
}

impl Twin {
    /// The twin as a device reads it: `{"desired":{..,"$version":n},"reported":{..}}`.
    pub fn to_device_json(&self) -> Value {
        let with_version = |map: &Map<String, Value>, version: u64| {
            let mut map = map.clone();
            map.insert("$version".into(), version.into());
            Value::Object(map)
        };
        serde_json::json!({
            "desired": with_version(&self.desired, self.desired_version),
            "reported": with_version(&self.reported, self.reported_version),
        })
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document {
    policies: Vec<Policy>,
    devices: BTreeMap<String, Device>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    certificates: Vec<CaCertificate>,
}

/// Why a registry operation was refused (as opposed to failing on disk).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The device id breaks IoT Hub's naming rule.
    #[error("invalid device id '{id}': {reason}")]
    InvalidId {
        /// The id given.
        id: String,
        /// What rule it breaks.
        reason: String,
    },
    /// No such device.
    #[error("device '{0}' is not registered")]
    NotFound(String),
    /// The device exists already.
    #[error("device '{0}' is already registered")]
    Exists(String),
    /// The etag given does not match (a change since it was read).
    #[error("device '{0}' changed since it was read (etag mismatch)")]
    EtagMismatch(String),
    /// A key is not base64.
    #[error("device '{0}': a key is not base64")]
    BadKey(String),
    /// A certificate thumbprint is not 40 or 64 hex digits (SHA-1 or SHA-256).
    #[error("thumbprint '{0}' is not 40 or 64 hex digits (SHA-1 or SHA-256)")]
    BadThumbprint(String),
    /// A CA certificate is not one (not PEM, not a CA, not exactly one certificate).
    #[error("{0}")]
    BadCertificate(String),
    /// A CA certificate name is taken.
    #[error("a CA certificate named '{0}' is already registered")]
    CertificateExists(String),
    /// No CA certificate by that name.
    #[error("no CA certificate named '{0}' is registered")]
    CertificateNotFound(String),
    /// Reading or writing the file failed.
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

/// A file's modification time, inode and length.
type Stamp = (SystemTime, u64, u64);

/// The registry, shared by the device endpoint, the service API and the CLI.
/// Clones share one in-memory copy.
///
/// A change holds the in-memory copy's lock only for moments, never across the file
/// lock or the disk: readers (every service call checks its token against the
/// registry's generation) never wait for a write. Changes wait for one another, in
/// this process through `writing`, across instances through [`LOCK_FILE`].
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
    writing: Arc<Mutex<()>>,
    path: PathBuf,
}

struct Inner {
    doc: Document,
    /// The file's identity when last read or written: every write renames a new file
    /// into place, so its inode tells a change even within the clock's granularity.
    seen: Option<Stamp>,
    /// Raised whenever `doc` is read again or changed.
    generation: u64,
    /// When the file was last compared with `seen`.
    checked: Option<Instant>,
}

impl Registry {
    /// Opens the registry in `dir`, creating the folder and the file (with IoT Hub's
    /// default policies) on first use.
    ///
    /// # Errors
    /// When the folder or the file cannot be created or read, or the file is not a
    /// registry.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
        let path = dir.join(FILE);
        let mut inner = Inner {
            doc: Document::default(),
            seen: None,
            generation: 0,
            checked: None,
        };
        if path.exists() {
            inner.reload(&path)?;
        } else {
            // Two instances starting on a new folder at once: one makes the file, the
            // other reads it, rather than each writing policies of its own.
            let _locked = lock_file(&path)?;
            if path.exists() {
                inner.reload(&path)?;
            } else {
                let doc = Document {
                    policies: default_policies(),
                    ..Document::default()
                };
                write_file(&path, &doc)?;
                inner.adopt(&path, doc);
            }
        }
        Ok(Self {
            path,
            inner: Arc::new(Mutex::new(inner)),
            writing: Arc::default(),
        })
    }

    /// The registry file's path.
    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the current document (read again if it changed on disk).
    fn read<T>(&self, f: impl FnOnce(&Document) -> T) -> anyhow::Result<T> {
        let mut inner = self.lock();
        inner.refresh(&self.path)?;
        Ok(f(&inner.doc))
    }

    /// Runs `f` on the current document and writes it back if `f` succeeds, holding
    /// the cross-process lock throughout, so that no other process's change comes
    /// between reading the file and writing it. Readers see the document before the
    /// change until it is on disk.
    fn change<T>(
        &self,
        f: impl FnOnce(&mut Document) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let _writer = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let _locked = lock_file(&self.path)?;
        let mut doc = {
            let mut inner = self.lock();
            inner.refresh(&self.path)?;
            inner.doc.clone()
        };
        let out = f(&mut doc)?;
        write_file(&self.path, &doc)?;
        self.lock().adopt(&self.path, doc);
        Ok(out)
    }

    /// Runs `change`, a change of the registry, on a blocking thread. A change waits
    /// for the file lock (another instance may hold it) and for the disk (an fsync),
    /// and the thread that awaits this may be the event loop serving every connection
    /// (the hub's default, with its embedded broker).
    ///
    /// # Errors
    /// As `change`, or when the blocking thread could not run it to the end.
    pub async fn off_loop<T: Send + 'static>(
        &self,
        change: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, RegistryError> {
        let registry = self.clone();
        tokio::task::spawn_blocking(move || change(&registry))
            .await
            .unwrap_or_else(|error| {
                Err(RegistryError::Io(anyhow::anyhow!(
                    "the registry change did not finish: {error}"
                )))
            })
    }

    /// A number that changes whenever the registry does, so that what was checked
    /// against it (a service token) can be trusted until it changes. A change made
    /// through this registry raises it at once; one made on disk, by another instance
    /// or by hand, within [`RECHECK`] (the file is looked at no more often).
    ///
    /// # Errors
    /// When the file changed on disk and cannot be read.
    pub fn generation(&self) -> anyhow::Result<u64> {
        let mut inner = self.lock();
        let now = Instant::now();
        if inner
            .checked
            .is_none_or(|at| now.duration_since(at) >= RECHECK)
        {
            inner.refresh(&self.path)?;
            inner.checked = Some(now);
        }
        Ok(inner.generation)
    }

    /// Whether `id` is registered.
    ///
    /// # Errors
    /// When the file changed on disk and cannot be read.
    pub fn contains_device(&self, id: &str) -> anyhow::Result<bool> {
        self.read(|doc| doc.devices.contains_key(id))
    }

    /// A device, if registered.
    ///
    /// # Errors
    /// When the file changed on disk and cannot be read.
    pub fn device(&self, id: &str) -> anyhow::Result<Option<Device>> {
        self.read(|doc| doc.devices.get(id).cloned())
    }

    /// Every device, by id.
    ///
    /// # Errors
    /// When the file changed on disk and cannot be read.
    pub fn devices(&self) -> anyhow::Result<BTreeMap<String, Device>> {
        self.read(|doc| doc.devices.clone())
    }

    /// A policy by name.
    ///
    /// # Errors
    /// When the file changed on disk and cannot be read.
    pub fn policy(&self, name: &str) -> anyhow::Result<Option<Policy>> {
        self.read(|doc| doc.policies.iter().find(|p| p.name == name).cloned())
    }

    /// Registers a new device; keys given as `None` are generated.
    ///
    /// # Errors
    /// [`RegistryError::InvalidId`], [`RegistryError::Exists`], [`RegistryError::BadKey`],
    /// or a failure to write.
    pub fn add_device(
        &self,
        id: &str,
        keys: (Option<String>, Option<String>),
        status: Option<String>,
    ) -> Result<Device, RegistryError> {
        check_device_id(id)?;
        let device = new_device(id, keys, status)?;
        self.change(|doc| {
            if doc.devices.contains_key(id) {
                return Err(RegistryError::Exists(id.to_owned()));
            }
            doc.devices.insert(id.to_owned(), device.clone());
            Ok(device)
        })
    }

    /// Creates or updates a device, as IoT Hub's `PUT /devices/{id}`: without
    /// `if_match` the device must not exist; with it (`*` or the etag) it may. What
    /// `change` leaves `None` is kept, or takes its default for a new device. All of it
    /// is checked before anything is written, and written at once: a refused change
    /// leaves the registry as it was.
    ///
    /// # Errors
    /// As [`Registry::add_device`], [`RegistryError::BadThumbprint`] and
    /// [`RegistryError::EtagMismatch`].
    pub fn put_device(
        &self,
        id: &str,
        change: DeviceChange,
        if_match: Option<&str>,
    ) -> Result<Device, RegistryError> {
        check_device_id(id)?;
        if let Some(thumbprints) = &change.thumbprints {
            check_thumbprints(thumbprints)?;
        }
        let DeviceChange {
            keys,
            status,
            thumbprints,
            x509_ca,
        } = change;
        self.change(|doc| {
            let device = match (doc.devices.get_mut(id), if_match) {
                (None, _) => {
                    let device = new_device(id, keys, status)?;
                    doc.devices.entry(id.to_owned()).or_insert(device)
                }
                (Some(_), None) => return Err(RegistryError::Exists(id.to_owned())),
                (Some(device), Some(etag)) => {
                    if !etag_matches(etag, &device.etag) {
                        return Err(RegistryError::EtagMismatch(id.to_owned()));
                    }
                    if let Some(key) = keys.0 {
                        device.primary_key = checked_key(id, key)?;
                    }
                    if let Some(key) = keys.1 {
                        device.secondary_key = checked_key(id, key)?;
                    }
                    if let Some(status) = status {
                        device.status = status;
                    }
                    device.etag = new_etag();
                    device
                }
            };
            if let Some(thumbprints) = thumbprints {
                device.x509_thumbprints = thumbprints;
            }
            if let Some(x509_ca) = x509_ca {
                device.x509_ca = x509_ca;
            }
            Ok(device.clone())
        })
    }

    /// Removes a device (with `if_match`, only if its etag matches or is `*`).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::EtagMismatch`], or a failure to
    /// write.
    pub fn remove_device(&self, id: &str, if_match: Option<&str>) -> Result<(), RegistryError> {
        self.change(|doc| {
            let device = doc
                .devices
                .get(id)
                .ok_or_else(|| RegistryError::NotFound(id.to_owned()))?;
            if let Some(etag) = if_match
                && !etag_matches(etag, &device.etag)
            {
                return Err(RegistryError::EtagMismatch(id.to_owned()));
            }
            doc.devices.remove(id);
            Ok(())
        })
    }

    /// The CA certificates devices' certificates may be signed by.
    ///
    /// # Errors
    /// When the file changed on disk and cannot be read.
    pub fn certificates(&self) -> anyhow::Result<Vec<CaCertificate>> {
        self.read(|doc| doc.certificates.clone())
    }

    /// Trusts the CA certificate `pem` under `name` (letters, digits, `-`, `_`, `.`).
    ///
    /// # Errors
    /// [`RegistryError::BadCertificate`] when `pem` is not exactly one CA certificate or
    /// the name is invalid, [`RegistryError::CertificateExists`], or a failure to write.
    pub fn add_certificate(&self, name: &str, pem: &str) -> Result<CaCertificate, RegistryError> {
        let name_ok = (1..=128).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(RegistryError::BadCertificate(format!(
                "invalid certificate name '{name}': 1 to 128 letters, digits, '-', '_' or '.'"
            )));
        }
        let ca = crate::pki::ca_certificate(pem)
            .map_err(|e| RegistryError::BadCertificate(format!("{e:#}")))?;
        let certificate = CaCertificate {
            name: name.to_owned(),
            pem: pem.trim().to_owned() + "\n",
            thumbprint: ca.thumbprint,
            subject: ca.subject,
        };
        self.change(|doc| {
            if doc.certificates.iter().any(|c| c.name == name) {
                return Err(RegistryError::CertificateExists(name.to_owned()));
            }
            doc.certificates.push(certificate.clone());
            Ok(certificate)
        })
    }

    /// No longer trusts the CA certificate `name`.
    ///
    /// # Errors
    /// [`RegistryError::CertificateNotFound`] or a failure to write.
    pub fn remove_certificate(&self, name: &str) -> Result<(), RegistryError> {
        self.change(|doc| {
            let before = doc.certificates.len();
            doc.certificates.retain(|c| c.name != name);
            if doc.certificates.len() == before {
                return Err(RegistryError::CertificateNotFound(name.to_owned()));
            }
            Ok(())
        })
    }

    /// Applies a JSON merge patch (RFC 7386: `null` deletes) to a device's reported
    /// properties and returns their new version.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] or a failure to write.
    pub fn patch_reported(
        &self,
        id: &str,
        patch: &Map<String, Value>,
    ) -> Result<u64, RegistryError> {
        self.change(|doc| {
            let device = doc
                .devices
                .get_mut(id)
                .ok_or_else(|| RegistryError::NotFound(id.to_owned()))?;
            merge(&mut device.twin.reported, patch);
            device.twin.reported_version += 1;
            Ok(device.twin.reported_version)
        })
    }
}

/// Takes the exclusive advisory lock on [`LOCK_FILE`] beside the registry at
/// `registry`, waiting for another process that holds it; it is released when the
/// returned file is dropped.
fn lock_file(registry: &Path) -> anyhow::Result<std::fs::File> {
    let path = registry.with_file_name(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the registry's lock file {}", path.display()))?;
    file.lock()
        .with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(file)
}

/// The identity of the file at `path` (see [`Stamp`]), if it is there.
fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, inode, meta.len()))
}

/// Writes `doc` to `path` atomically: a new file, synced, renamed into place.
fn write_file(path: &Path, doc: &Document) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(doc).context("serializing the registry")?;
    let tmp = path.with_file_name(format!(".{FILE}.{:08x}.tmp", rand::random::<u32>()));
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

impl Inner {
    /// Reads the registry at `path` again if it changed on disk.
    fn refresh(&mut self, path: &Path) -> anyhow::Result<()> {
        if stamp(path) != self.seen {
            self.reload(path)?;
        }
        Ok(())
    }

    fn reload(&mut self, path: &Path) -> anyhow::Result<()> {
        let seen = stamp(path);
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the registry {}", path.display()))?;
        self.doc = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a registry", path.display()))?;
        self.seen = seen;
        self.generation += 1;
        Ok(())
    }

    /// Takes `doc`, just written to `path`, as the current document.
    fn adopt(&mut self, path: &Path, doc: Document) {
        self.doc = doc;
        self.seen = stamp(path);
        self.generation += 1;
    }
}

/// IoT Hub's default shared access policies.
fn default_policies() -> Vec<Policy> {
    use Right::*;
    [
        (
            "iothubowner",
            vec![RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect],
        ),
        ("service", vec![ServiceConnect]),
        ("device", vec![DeviceConnect]),
        ("registryRead", vec![RegistryRead]),
        ("registryReadWrite", vec![RegistryRead, RegistryWrite]),
    ]
    .into_iter()
    .map(|(name, rights)| Policy {
        name: name.to_owned(),
        primary_key: generate_key(),
        secondary_key: generate_key(),
        rights,
    })
    .collect()
}

/// Refuses a thumbprint that is not 40 or 64 hex digits (SHA-1 or SHA-256).
fn check_thumbprints(thumbprints: &[String]) -> Result<(), RegistryError> {
    for thumbprint in thumbprints {
        let hex = thumbprint.trim();
        if !matches!(hex.len(), 40 | 64) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RegistryError::BadThumbprint(thumbprint.clone()));
        }
    }
    Ok(())
}

fn new_device(
    id: &str,
    (primary, secondary): (Option<String>, Option<String>),
    status: Option<String>,
) -> Result<Device, RegistryError> {
    Ok(Device {
        primary_key: primary.map_or_else(|| Ok(generate_key()), |k| checked_key(id, k))?,
        secondary_key: secondary.map_or_else(|| Ok(generate_key()), |k| checked_key(id, k))?,
        status: status.unwrap_or_else(|| "enabled".to_owned()),
        etag: new_etag(),
        generation_id: format!("{:018}", rand::random::<u64>() % 1_000_000_000_000_000_000),
        twin: Twin {
            desired_version: 1,
            reported_version: 1,
            ..Twin::default()
        },
        x509_thumbprints: Vec::new(),
        x509_ca: false,
    })
}

fn checked_key(id: &str, key: String) -> Result<String, RegistryError> {
    use base64::Engine as _;
    match base64::engine::general_purpose::STANDARD.decode(key.as_bytes()) {
        Ok(bytes) if (16..=64).contains(&bytes.len()) => Ok(key),
        _ => Err(RegistryError::BadKey(id.to_owned())),
    }
}

/// Whether an `If-Match` value (`*` or an etag, quoted or not: the SDKs quote both)
/// matches `etag`.
fn etag_matches(if_match: &str, etag: &str) -> bool {
    let given = if_match.trim().trim_matches('"');
    given == "*" || given == etag
}

fn new_etag() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// IoT Hub's device id rule, as `edge_proto` checks it for the backend topics.
///
/// # Errors
/// [`RegistryError::InvalidId`] saying which rule.
pub fn check_device_id(id: &str) -> Result<(), RegistryError> {
    edge_proto::topic::check_device_id(id).map_err(|e| RegistryError::InvalidId {
        id: id.to_owned(),
        reason: e.to_string(),
    })
}

/// RFC 7386 merge of `patch` into `target`.
fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                let entry = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(existing) = entry {
                    merge(existing, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_change_waiting_for_the_file_lock_keeps_no_reader_waiting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(dir.path()).expect("opens");
        registry.add_device("d1", (None, None), None).expect("adds");
        // Another instance holds the file lock, as while it writes.
        let other = lock_file(&registry.path()).expect("locks");
        let writer = std::thread::spawn({
            let registry = registry.clone();
            move || registry.add_device("d2", (None, None), None)
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!writer.is_finished(), "the change waits for the file lock");
        let (read, answered) = std::sync::mpsc::channel();
        std::thread::spawn({
            let registry = registry.clone();
            move || {
                read.send(registry.devices().map(|devices| devices.len()))
                    .ok()
            }
        });
        let seen = answered
            .recv_timeout(Duration::from_secs(5))
            .expect("a read does not wait for the change");
        assert_eq!(
            seen.expect("reads"),
            1,
            "the read sees the registry before the change"
        );
        drop(other);
        writer
            .join()
            .expect("joins")
            .expect("the change goes through");
        assert!(registry.contains_device("d2").expect("reads"));
    }

    #[test]
    fn a_new_registry_has_iot_hubs_policies_and_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(dir.path()).expect("opens");
        let owner = registry
            .policy("iothubowner")
            .expect("reads")
            .expect("there");
        assert!(owner.rights.contains(&Right::ServiceConnect));
        let device = registry.add_device("d1", (None, None), None).expect("adds");
        let again = Registry::open(dir.path()).expect("reopens");
        assert_eq!(again.device("d1").expect("reads"), Some(device));
        assert_eq!(
            again.policy("iothubowner").expect("reads"),
            Some(owner),
            "keys are kept"
        );
    }

    #[test]
    fn a_second_instance_sees_changes_made_by_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = Registry::open(dir.path()).expect("opens");
        let two = Registry::open(dir.path()).expect("opens");
        one.add_device("d1", (None, None), None).expect("adds");
        assert!(two.device("d1").expect("reads").is_some());
        two.remove_device("d1", None).expect("removes");
        assert!(one.device("d1").expect("reads").is_none());
    }

    #[test]
    fn a_refused_put_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(dir.path()).expect("opens");
        let bad = DeviceChange {
            status: Some("disabled".into()),
            thumbprints: Some(vec!["xyz".into()]),
            x509_ca: Some(true),
            ..DeviceChange::default()
        };
        assert!(matches!(
            registry.put_device("d1", bad.clone(), None),
            Err(RegistryError::BadThumbprint(_))
        ));
        assert_eq!(registry.device("d1").expect("reads"), None, "not created");
        let before = registry
            .put_device("d1", DeviceChange::default(), None)
            .expect("creates");
        assert!(matches!(
            registry.put_device("d1", bad, Some("*")),
            Err(RegistryError::BadThumbprint(_))
        ));
        assert_eq!(
            registry.device("d1").expect("reads"),
            Some(before),
            "not changed"
        );
        let thumbprint = "ab".repeat(32);
        let after = registry
            .put_device(
                "d1",
                DeviceChange {
                    thumbprints: Some(vec![thumbprint.clone()]),
                    x509_ca: Some(true),
                    ..DeviceChange::default()
                },
                Some("*"),
            )
            .expect("changes");
        assert_eq!(
            (after.x509_thumbprints, after.x509_ca),
            (vec![thumbprint], true)
        );
    }

    #[test]
    fn the_generation_moves_at_once_for_own_changes_and_within_recheck_for_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = Registry::open(dir.path()).expect("opens");
        let two = Registry::open(dir.path()).expect("opens");
        let first = one.generation().expect("reads");
        one.add_device("d1", (None, None), None).expect("adds");
        let own = one.generation().expect("reads");
        assert_ne!(own, first, "a change made here shows at once");
        let started = Instant::now();
        two.add_device("d2", (None, None), None).expect("adds");
        if started.elapsed() < RECHECK / 2 {
            assert_eq!(
                one.generation().expect("reads"),
                own,
                "the file is not looked at again within RECHECK"
            );
        }
        std::thread::sleep(RECHECK);
        assert_ne!(
            one.generation().expect("reads"),
            own,
            "a change on disk shows once RECHECK has passed"
        );
    }

    #[test]
    fn concurrent_changes_through_two_instances_are_all_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let instances = [
            Registry::open(dir.path()).expect("opens"),
            Registry::open(dir.path()).expect("opens"),
        ];
        std::thread::scope(|scope| {
            for (n, registry) in instances.iter().enumerate() {
                scope.spawn(move || {
                    for i in 0..40 {
                        registry
                            .add_device(&format!("d{n}-{i}"), (None, None), None)
                            .expect("adds");
                    }
                });
            }
        });
        for registry in &instances {
            assert_eq!(
                registry.devices().expect("reads").len(),
                80,
                "no change lost"
            );
        }
        assert_eq!(
            Registry::open(dir.path())
                .expect("reopens")
                .devices()
                .expect("reads")
                .len(),
            80
        );
    }

    #[test]
    fn refusals_say_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(dir.path()).expect("opens");
        registry.add_device("d1", (None, None), None).expect("adds");
        assert!(matches!(
            registry.add_device("d1", (None, None), None),
            Err(RegistryError::Exists(_))
        ));
        assert!(matches!(
            registry.add_device("bad/id", (None, None), None),
            Err(RegistryError::InvalidId { .. })
        ));
        assert!(matches!(
            registry.add_device("d2", (Some("nope!".into()), None), None),
            Err(RegistryError::BadKey(_))
        ));
        assert!(matches!(
            registry.remove_device("d9", None),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            registry.put_device("d1", DeviceChange::default(), Some("\"wrong\"")),
            Err(RegistryError::EtagMismatch(_))
        ));
        registry
            .remove_device("d1", Some("\"*\""))
            .expect("a quoted wildcard matches");
    }

    #[test]
    fn reported_patches_merge_and_raise_the_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(dir.path()).expect("opens");
        registry.add_device("d1", (None, None), None).expect("adds");
        let patch = |v: Value| v.as_object().cloned().expect("an object");
        assert_eq!(
            registry
                .patch_reported("d1", &patch(serde_json::json!({"a":{"b":1,"c":2},"x":1})))
                .expect("patches"),
            2
        );
        assert_eq!(
            registry
                .patch_reported("d1", &patch(serde_json::json!({"a":{"b":null},"x":null})))
                .expect("patches"),
            3
        );
        let twin = registry.device("d1").expect("reads").expect("there").twin;
        assert_eq!(
            Value::Object(twin.reported),
            serde_json::json!({"a":{"c":2}})
        );
    }
}
