//! A principal's credentials on disk.
//!
//! A credentials directory holds three files:
//!
//! - [`KEY_FILE`]: the 32-byte ed25519 secret key, raw, mode 0600. Loading
//!   refuses a key file any group or other permission bit is set on.
//! - [`STORE_FILE`]: the blessing store: `"FLOWBSTO"`, varint(version = 1),
//!   the default [`Blessings`], varint(#entries), then per entry
//!   str(pattern) and [`Blessings`] (wire encoding of
//!   [`encoding`](super::encoding)).
//! - [`ROOTS_FILE`]: the trusted roots: `"FLOWROOT"`, varint(version = 1),
//!   varint(#entries), then per entry public_key[32] and str(pattern).
//!
//! Every file is written to a temporary file in the directory and then moved
//! into place, so a crash leaves either the old or the new version. The key
//! file is linked into place, never replacing an existing one.
//!
//! Errors: I/O failures and refusals (a key already present, a key file
//! readable by others, a store holding someone else's blessings) are
//! [`ErrorKind::BadState`]; malformed file contents are
//! [`ErrorKind::BadArg`], naming the file.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use flow_message::codec::{Reader, put_str, put_varint};
use flow_message::{DecodeError, DecodeErrorKind};
use rand::Rng;

use super::blessings::Blessings;
use super::encoding::read_key;
use super::keys::PUBLIC_KEY_LEN;
use super::pattern::{BlessingPattern, validate_name};
use super::principal::{Principal, SECRET_KEY_LEN};
use crate::{Error, ErrorKind, Result};

/// Name of the secret key file in a credentials directory.
pub const KEY_FILE: &str = "key";
/// Name of the blessing store file in a credentials directory.
pub const STORE_FILE: &str = "blessings";
/// Name of the trusted roots file in a credentials directory.
pub const ROOTS_FILE: &str = "roots";

const STORE_MAGIC: &[u8; 8] = b"FLOWBSTO";
const ROOTS_MAGIC: &[u8; 8] = b"FLOWROOT";
const FORMAT_VERSION: u64 = 1;

fn io_error(what: &str, path: &Path, err: std::io::Error) -> Error {
    Error::with_source(
        ErrorKind::BadState,
        format!("{what} {}: {err}", path.display()),
        err,
    )
}

impl Principal {
    /// Creates a credentials directory at `dir` (and its parents, mode 0700)
    /// for a new principal blessed by itself as `name` (see
    /// [`Principal::with_self_blessing`]), and returns the principal.
    ///
    /// Fails with [`ErrorKind::BadState`] if `dir` already holds a key, and
    /// [`ErrorKind::BadArg`] if `name` is not a valid blessing name.
    pub fn create_dir(dir: impl AsRef<Path>, name: &str) -> Result<Principal> {
        let dir = dir.as_ref();
        validate_name(name)?;
        let key_path = dir.join(KEY_FILE);
        if fs::symlink_metadata(&key_path).is_ok() {
            return Err(Error::bad_state(format!(
                "credentials directory {} already holds a key ({})",
                dir.display(),
                key_path.display()
            )));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error("creating credentials directory", dir, e))?;
        let principal = Principal::new();
        principal.init_self_blessing(name)?;
        principal.save_dir(dir)?;
        Ok(principal)
    }

    /// Loads the principal whose credentials are in `dir`. A missing store
    /// or roots file loads as empty.
    ///
    /// Fails with [`ErrorKind::BadState`] if the key file is missing,
    /// unreadable, or grants any permission to group or others, or if the
    /// store holds blessings for another key; with [`ErrorKind::BadArg`] if a
    /// file is malformed.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Principal> {
        let dir = dir.as_ref();
        let secret = read_key_file(&dir.join(KEY_FILE))?;
        let principal = Principal::from_secret_key(&secret);

        let store_path = dir.join(STORE_FILE);
        if let Some(bytes) = read_optional(&store_path)? {
            let (default, peers) = decode_store(bytes).map_err(|e| malformed(&store_path, e))?;
            principal
                .blessing_store()
                .replace(default, peers)
                .map_err(|e| {
                    Error::bad_state(format!(
                        "blessing store {}: {}",
                        store_path.display(),
                        e.message()
                    ))
                })?;
        }

        let roots_path = dir.join(ROOTS_FILE);
        if let Some(bytes) = read_optional(&roots_path)? {
            let entries = decode_roots(bytes).map_err(|e| malformed(&roots_path, e))?;
            principal.roots().replace(entries);
        }
        Ok(principal)
    }

    /// Saves this principal's key, blessing store and roots into `dir`,
    /// which must exist. The key is written only if `dir` holds none yet.
    ///
    /// Fails with [`ErrorKind::BadState`] if `dir` holds the key of another
    /// principal (or a key file that may not be read), or on I/O failure.
    pub fn save_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let key_path = dir.join(KEY_FILE);
        if fs::symlink_metadata(&key_path).is_ok() {
            let existing = read_key_file(&key_path)?;
            if existing != self.secret_key_bytes() {
                return Err(Error::bad_state(format!(
                    "{} holds the key of another principal",
                    key_path.display()
                )));
            }
        } else {
            write_key_file(dir, &self.secret_key_bytes())?;
        }
        write_atomic(dir, STORE_FILE, &encode_store(self))?;
        write_atomic(dir, ROOTS_FILE, &encode_roots(self))?;
        sync_dir(dir);
        Ok(())
    }
}

fn malformed(path: &Path, err: DecodeError) -> Error {
    Error::from(err).context(format!("reading {}", path.display()))
}

fn read_key_file(path: &Path) -> Result<[u8; SECRET_KEY_LEN]> {
    let mut file = File::open(path).map_err(|e| io_error("opening key file", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| io_error("reading key file", path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::bad_state(format!(
            "key file {} has mode {mode:04o}: it must not be accessible by group or others \
             (chmod 600 it)",
            path.display()
        )));
    }
    let mut raw = Vec::with_capacity(SECRET_KEY_LEN + 1);
    (&mut file)
        .take(SECRET_KEY_LEN as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| io_error("reading key file", path, e))?;
    let result = <[u8; SECRET_KEY_LEN]>::try_from(raw.as_slice()).map_err(|_| {
        Error::bad_arg(format!(
            "key file {} is not a {SECRET_KEY_LEN}-byte key",
            path.display()
        ))
    });
    raw.fill(0);
    result
}

fn write_key_file(dir: &Path, secret: &[u8; SECRET_KEY_LEN]) -> Result<()> {
    let final_path = dir.join(KEY_FILE);
    let tmp = write_temp(dir, KEY_FILE, secret)?;
    // A hard link never replaces an existing file, unlike rename.
    let linked = fs::hard_link(&tmp, &final_path);
    let _ = fs::remove_file(&tmp);
    linked.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::bad_state(format!(
                "credentials directory {} already holds a key",
                dir.display()
            ))
        } else {
            io_error("writing key file", &final_path, e)
        }
    })
}

fn read_optional(path: &Path) -> Result<Option<Bytes>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(Bytes::from(bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("reading", path, e)),
    }
}

/// Writes `contents` to a new temporary file (mode 0600) in `dir` and
/// returns its path.
fn write_temp(dir: &Path, name: &str, contents: &[u8]) -> Result<PathBuf> {
    let suffix: u64 = rand::rng().next_u64();
    let tmp = dir.join(format!(".{name}.tmp.{}.{suffix:016x}", std::process::id()));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    match written {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(io_error("writing", &tmp, e))
        }
    }
}

fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> Result<()> {
    let tmp = write_temp(dir, name, contents)?;
    let final_path = dir.join(name);
    fs::rename(&tmp, &final_path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_error("replacing", &final_path, e)
    })
}

/// Makes renames in `dir` durable; best effort.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn encode_store(principal: &Principal) -> Bytes {
    let store = principal.blessing_store();
    let mut buf = BytesMut::new();
    buf.put_slice(STORE_MAGIC);
    put_varint(&mut buf, FORMAT_VERSION);
    store.default_blessings().encode(&mut buf);
    let peers = store.peer_blessings();
    put_varint(&mut buf, peers.len() as u64);
    for (pattern, blessings) in peers {
        put_str(&mut buf, pattern.as_str());
        blessings.encode(&mut buf);
    }
    buf.freeze()
}

type StoreContents = (Blessings, Vec<(BlessingPattern, Blessings)>);

fn read_header(r: &mut Reader, magic: &[u8; 8]) -> Result<(), DecodeError> {
    let found: [u8; 8] = r.array("magic")?;
    if &found != magic {
        return Err(r.error("magic", DecodeErrorKind::Invalid));
    }
    let version = r.varint("version")?;
    if version != FORMAT_VERSION {
        return Err(r.error("version", DecodeErrorKind::OutOfRange(version)));
    }
    Ok(())
}

fn read_pattern(r: &mut Reader) -> Result<BlessingPattern, DecodeError> {
    let text = r.string("pattern")?;
    BlessingPattern::new(text).map_err(|_| r.error("pattern", DecodeErrorKind::Invalid))
}

fn decode_store(bytes: Bytes) -> Result<StoreContents, DecodeError> {
    let mut r = Reader::new(bytes, "BlessingStoreFile");
    read_header(&mut r, STORE_MAGIC)?;
    let default = Blessings::read(&mut r)?;
    r.set_context("BlessingStoreFile");
    // An entry is at least a one-byte pattern and an empty blessings.
    let n = r.count("entries", 3)?;
    let mut peers = Vec::with_capacity(n);
    for _ in 0..n {
        r.set_context("BlessingStoreFile");
        let pattern = read_pattern(&mut r)?;
        let blessings = Blessings::read(&mut r)?;
        peers.push((pattern, blessings));
    }
    r.set_context("BlessingStoreFile");
    r.finish("end")?;
    Ok((default, peers))
}

fn encode_roots(principal: &Principal) -> Bytes {
    let entries = principal.roots().entries();
    let mut buf = BytesMut::new();
    buf.put_slice(ROOTS_MAGIC);
    put_varint(&mut buf, FORMAT_VERSION);
    put_varint(&mut buf, entries.len() as u64);
    for (key, pattern) in entries {
        buf.put_slice(key.as_bytes());
        put_str(&mut buf, pattern.as_str());
    }
    buf.freeze()
}

fn decode_roots(
    bytes: Bytes,
) -> Result<Vec<(super::keys::PublicKey, BlessingPattern)>, DecodeError> {
    let mut r = Reader::new(bytes, "BlessingRootsFile");
    read_header(&mut r, ROOTS_MAGIC)?;
    let n = r.count("entries", PUBLIC_KEY_LEN + 2)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let key = read_key(&mut r, "public_key")?;
        let pattern = read_pattern(&mut r)?;
        entries.push((key, pattern));
    }
    r.finish("end")?;
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::ValidationContext;
    use proptest::prelude::*;

    #[test]
    fn create_load_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("creds").join("alice");
        let alice = Principal::create_dir(&dir, "alice").unwrap();
        let key_mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o077,
            0,
            "directory is private"
        );

        let loaded = Principal::load_dir(&dir).unwrap();
        assert_eq!(loaded.public_key(), alice.public_key());
        assert_eq!(loaded.default_blessings(), alice.default_blessings());
        assert_eq!(
            loaded.blessing_store().peer_blessings(),
            alice.blessing_store().peer_blessings()
        );
        assert_eq!(loaded.roots().entries(), alice.roots().entries());
        let out = loaded
            .default_blessings()
            .validate(&ValidationContext::new(loaded.roots()));
        assert_eq!(out.valid, ["alice"]);

        // Changes are saved and reloaded.
        let bob = Principal::new();
        let friend = bob.bless_self("bob", vec![]).unwrap();
        loaded.add_to_roots(&friend).unwrap();
        let extra = loaded.bless_self("alice2", vec![]).unwrap();
        loaded
            .blessing_store()
            .set(extra.clone(), BlessingPattern::prefix("bob").unwrap())
            .unwrap();
        loaded.save_dir(&dir).unwrap();
        let again = Principal::load_dir(&dir).unwrap();
        assert_eq!(again.roots().len(), 2);
        again
            .roots()
            .recognized(&bob.public_key(), "bob:x")
            .unwrap();
        assert_eq!(again.blessing_store().for_peer(&["bob"]).names().len(), 2);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Principal::create_dir(tmp.path(), "first").unwrap();
        let err = Principal::create_dir(tmp.path(), "second").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadState);
        let err = Principal::new().save_dir(tmp.path()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadState);
        assert_eq!(
            Principal::load_dir(tmp.path()).unwrap().public_key(),
            first.public_key()
        );
        assert_eq!(
            Principal::create_dir(tmp.path().join("x"), "bad name")
                .unwrap_err()
                .kind(),
            ErrorKind::BadArg
        );
    }

    #[test]
    fn refuses_readable_key_file() {
        let tmp = tempfile::tempdir().unwrap();
        Principal::create_dir(tmp.path(), "alice").unwrap();
        let key = tmp.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Principal::load_dir(tmp.path()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadState);
        assert!(err.message().contains("0644"), "{err}");
        assert!(err.message().contains(&key.display().to_string()), "{err}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        Principal::load_dir(tmp.path()).unwrap();
    }

    #[test]
    fn rejects_bad_files() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            Principal::load_dir(tmp.path()).unwrap_err().kind(),
            ErrorKind::BadState
        );
        Principal::create_dir(tmp.path(), "alice").unwrap();

        fs::write(tmp.path().join(STORE_FILE), b"FLOWBSTO\x02").unwrap();
        let err = Principal::load_dir(tmp.path()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(err.message().contains(STORE_FILE), "{err}");

        // Someone else's blessings in the store.
        let other = Principal::create_dir(tmp.path().join("other"), "other").unwrap();
        fs::write(tmp.path().join(STORE_FILE), encode_store(&other)).unwrap();
        assert_eq!(
            Principal::load_dir(tmp.path()).unwrap_err().kind(),
            ErrorKind::BadState
        );
        fs::remove_file(tmp.path().join(STORE_FILE)).unwrap();

        fs::write(tmp.path().join(ROOTS_FILE), b"nonsense").unwrap();
        assert_eq!(
            Principal::load_dir(tmp.path()).unwrap_err().kind(),
            ErrorKind::BadArg
        );
        fs::remove_file(tmp.path().join(ROOTS_FILE)).unwrap();
        assert!(Principal::load_dir(tmp.path()).unwrap().roots().is_empty());

        let key = tmp.path().join(KEY_FILE);
        fs::remove_file(&key).unwrap();
        fs::write(&key, [1u8; 31]).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            Principal::load_dir(tmp.path()).unwrap_err().kind(),
            ErrorKind::BadArg
        );
    }

    proptest! {
        #[test]
        fn file_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut store = STORE_MAGIC.to_vec();
            store.push(1);
            store.extend_from_slice(&bytes);
            let _ = decode_store(Bytes::from(store));
            let mut roots = ROOTS_MAGIC.to_vec();
            roots.push(1);
            roots.extend_from_slice(&bytes);
            let _ = decode_roots(Bytes::from(roots));
            let _ = decode_store(Bytes::from(bytes.clone()));
            let _ = decode_roots(Bytes::from(bytes));
        }
    }
}
