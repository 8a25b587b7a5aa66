//! `flowctl creds`: create, bless and show credentials directories.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use flow::security::{BlessingPattern, Blessings, Caveat, Principal};
use flow::{Error, Result};

/// Credentials subcommands.
#[derive(Subcommand)]
pub(crate) enum CredsCommand {
    /// A new principal in DIR, blessed by itself as NAME. Refuses to
    /// overwrite existing credentials.
    Create {
        /// The credentials directory.
        dir: PathBuf,
        /// The self-blessing's name.
        #[arg(long)]
        name: String,
    },
    /// DIR blesses DIR2's key as `<DIR's name>:EXT`; DIR2 trusts DIR's root.
    Bless {
        /// The blesser's credentials.
        #[arg(long)]
        from: PathBuf,
        /// The blessed principal's credentials.
        #[arg(long)]
        to: PathBuf,
        /// The extension added to the blesser's name.
        #[arg(long)]
        extension: String,
        /// Expire the blessing after this long (e.g. `24h`, `30m`).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        valid_for: Option<Duration>,
    },
    /// Print a principal's public key, blessings, roots and expiries.
    Show {
        /// The credentials directory.
        dir: PathBuf,
    },
}

/// Runs a credentials subcommand.
pub(crate) fn run(cmd: CredsCommand) -> Result<()> {
    match cmd {
        CredsCommand::Create { dir, name } => {
            let p = Principal::create_dir(&dir, &name)?;
            println!("created {} as {name}", dir.display());
            println!("public key: {}", p.public_key());
            Ok(())
        }
        CredsCommand::Bless {
            from,
            to,
            extension,
            valid_for,
        } => bless(&from, &to, &extension, valid_for),
        CredsCommand::Show { dir } => show(&Principal::load_dir(&dir)?),
    }
}

fn bless(from: &PathBuf, to: &PathBuf, extension: &str, valid_for: Option<Duration>) -> Result<()> {
    let blesser = Principal::load_dir(from)?;
    let grantee = Principal::load_dir(to)?;
    let with = blesser.default_blessings();
    if with.is_empty() {
        return Err(Error::bad_state(format!(
            "{} has no default blessings to bless with",
            from.display()
        )));
    }
    let caveats = valid_for.map(Caveat::expires_in).into_iter().collect();
    let new = blesser.bless(grantee.public_key(), &with, extension, caveats)?;
    let default = Blessings::union(&[grantee.default_blessings(), new.clone()])?;
    grantee.blessing_store().set_default(default)?;
    let for_all = grantee
        .blessing_store()
        .peer_blessings()
        .into_iter()
        .find(|(p, _)| p.is_all())
        .map(|(_, b)| b)
        .unwrap_or_else(Blessings::empty);
    grantee.blessing_store().set(
        Blessings::union(&[for_all, new.clone()])?,
        BlessingPattern::all(),
    )?;
    grantee.add_to_roots(&with)?;
    grantee.save_dir(to)?;
    for name in new.names() {
        println!("blessed {} as {name}", to.display());
    }
    Ok(())
}

fn show(p: &Principal) -> Result<()> {
    println!("public key: {}", p.public_key());
    let blessings = p.default_blessings();
    if blessings.is_empty() {
        println!("blessings: none");
    }
    for chain in blessings.chains() {
        let name = chain
            .iter()
            .map(|c| c.extension())
            .collect::<Vec<_>>()
            .join(":");
        let expiry = chain
            .iter()
            .flat_map(|c| c.caveats())
            .filter_map(|c| match c {
                Caveat::Expiry(at) => Some(*at),
                _ => None,
            })
            .min();
        match expiry {
            Some(at) => println!("blessing: {name} (expires {})", describe(at)),
            None => println!("blessing: {name} (no expiry)"),
        }
    }
    for (pattern, b) in p.blessing_store().peer_blessings() {
        println!("presents to {pattern}: {}", b.names().join(", "));
    }
    for (key, pattern) in p.roots().entries() {
        println!("trusts root {key} for {pattern}");
    }
    Ok(())
}

fn describe(at: SystemTime) -> String {
    let stamp = humantime::format_rfc3339_seconds(at);
    match at.duration_since(SystemTime::now()) {
        Ok(left) => format!("{stamp}, in {}", humantime::format_duration(round(left))),
        Err(_) => format!("{stamp}, expired"),
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}
