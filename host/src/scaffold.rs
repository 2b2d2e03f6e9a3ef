//! `sagahost plugin new NAME --lang rust|js|python`: a new step project from a template.
//!
//! The templates are the directories under `plugins/templates/<lang>/`, embedded in the binary
//! at build time (`build.rs` lists them), so the command works on a machine that has only the
//! `sagahost` binary. In every file, `{{name}}` becomes the plugin name, `{{name_snake}}` the
//! name with `-` turned into `_` (Rust's library name), and, for Rust, `{{sdk}}` the
//! dependency on the plugin SDK (`--sdk-path` or `--sdk-git`). JavaScript and Python projects
//! also get the WIT package the host serves (`wit/`), which their toolchains read.
//!
//! The project is written into a temporary sibling directory and renamed into place, so an
//! interrupted command leaves either nothing or a whole project; an existing non-empty
//! directory is never touched.

use std::path::{Path, PathBuf};

use crate::runner::{RAN, USAGE};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/templates.rs"));
}

/// The plugin SDK of the source tree this binary was built from, the default `--sdk-path`
/// while it still exists.
const BUILT_FROM_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/sdk");

/// A template's language.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Rust, with the sagahost plugin SDK (cargo, target wasm32-wasip2).
    Rust,
    /// JavaScript, built with componentize-js (Node.js and npm).
    Js,
    /// Python, built with componentize-py (Python 3.10 or later).
    Python,
}

impl Lang {
    fn dir(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Js => "js",
            Lang::Python => "python",
        }
    }

    /// Does the project need its own copy of the WIT package (the SDK carries Rust's)?
    fn needs_wit(self) -> bool {
        self != Lang::Rust
    }
}

/// `sagahost plugin new`.
#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// The plugin's name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter
    /// (the name it is uploaded under).
    name: String,
    /// The language of the step.
    #[arg(long, value_enum)]
    lang: Lang,
    /// Where to create the project. Default: ./NAME. Must not exist, or be empty.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Rust: depend on the plugin SDK at this path (the `plugins/sdk` directory of a sagahost
    /// checkout). Default: the SDK of the source tree this binary was built from, if present.
    #[arg(long, conflicts_with = "sdk_git")]
    sdk_path: Option<PathBuf>,
    /// Rust: depend on the plugin SDK in this git repository (a sagahost repository URL).
    #[arg(long)]
    sdk_git: Option<String>,
    /// Rust, with --sdk-git: the branch, tag or commit to use.
    #[arg(long, requires = "sdk_git")]
    sdk_rev: Option<String>,
}

/// Why `new` refused: a message for stderr (always a usage error, exit 2).
type Refusal = String;

/// Runs `sagahost plugin new`; returns the exit code (0, or 2 with the reason on stderr).
pub fn new(args: NewArgs) -> u8 {
    match create(&args) {
        Ok(dir) => {
            println!("created {} ({} step '{}')", dir.display(), args.lang.dir(), args.name);
            println!("next: cd {} and follow its README.md to build, test and run it", dir.display());
            RAN
        }
        Err(reason) => {
            eprintln!("error: {reason}");
            USAGE
        }
    }
}

fn create(args: &NewArgs) -> Result<PathBuf, Refusal> {
    if !crate::engine::definition::is_valid_name(&args.name) {
        return Err(format!(
            "invalid plugin name '{}': use 1-64 lowercase letters, digits, '-' or '_', starting with a letter",
            args.name
        ));
    }
    let sdk = match args.lang {
        Lang::Rust => Some(sdk_dependency(args)?),
        _ if args.sdk_path.is_some() || args.sdk_git.is_some() => {
            return Err("--sdk-path and --sdk-git apply to --lang rust only".to_owned())
        }
        _ => None,
    };
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(&args.name));
    let files = render(args.lang, &args.name, sdk.as_deref());
    write_project(&dir, &files)?;
    Ok(dir)
}

/// The `sagahost-plugin-sdk = ...` value of the Rust template's Cargo.toml.
fn sdk_dependency(args: &NewArgs) -> Result<String, Refusal> {
    if let Some(url) = &args.sdk_git {
        let rev = args.sdk_rev.as_ref().map(|r| format!(", rev = {}", toml_string(r))).unwrap_or_default();
        return Ok(format!("{{ git = {}{rev} }}", toml_string(url)));
    }
    let path = match &args.sdk_path {
        Some(path) => path.clone(),
        None if Path::new(BUILT_FROM_SDK).join("Cargo.toml").is_file() => PathBuf::from(BUILT_FROM_SDK),
        None => {
            return Err("a Rust step depends on the sagahost plugin SDK: pass --sdk-path DIR (the plugins/sdk \
                        directory of a sagahost checkout) or --sdk-git URL"
                .to_owned())
        }
    };
    let path = std::fs::canonicalize(&path).map_err(|e| format!("--sdk-path {}: {e}", path.display()))?;
    if !path.join("Cargo.toml").is_file() {
        return Err(format!(
            "--sdk-path {}: no Cargo.toml there; point it at plugins/sdk of a sagahost checkout",
            path.display()
        ));
    }
    let path = path.to_str().ok_or_else(|| format!("--sdk-path {}: not UTF-8", path.display()))?;
    Ok(format!("{{ path = {} }}", toml_string(path)))
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut quoted = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// The project's files: (relative path, contents).
fn render(lang: Lang, name: &str, sdk: Option<&str>) -> Vec<(String, String)> {
    let snake = name.replace('-', "_");
    let mut files: Vec<(String, String)> = embedded::TEMPLATES
        .iter()
        .filter(|(language, _, _)| *language == lang.dir())
        .map(|(_, path, contents)| {
            let mut text = contents.replace("{{name_snake}}", &snake).replace("{{name}}", name);
            if let Some(sdk) = sdk {
                text = text.replace("{{sdk}}", sdk);
            }
            (path.to_string(), text)
        })
        .collect();
    if lang.needs_wit() {
        files.extend(embedded::WIT.iter().map(|(path, contents)| (format!("wit/{path}"), contents.to_string())));
    }
    files
}

/// Writes `files` under `dir`: into a temporary sibling first, renamed into place at the end.
fn write_project(dir: &Path, files: &[(String, String)]) -> Result<(), Refusal> {
    let shown = dir.display();
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(format!("{shown} already exists and is not empty; choose another --dir"));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{shown}: {e}")),
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let staging = parent.join(format!(".sagahost-new-{}", uuid::Uuid::new_v4().simple()));
    let written = stage(&staging, files).and_then(|()| {
        // An empty directory in the way (allowed above) is replaced.
        if dir.exists() {
            std::fs::remove_dir(dir).map_err(|e| format!("{shown}: {e}"))?;
        }
        std::fs::rename(&staging, dir).map_err(|e| format!("cannot move the new project to {shown}: {e}"))
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    written
}

/// Writes `files` under the new directory `staging`.
fn stage(staging: &Path, files: &[(String, String)]) -> Result<(), Refusal> {
    std::fs::create_dir(staging).map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
    for (path, contents) in files {
        let target = staging.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&target, contents).map_err(|e| format!("cannot write {}: {e}", target.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_has_a_template_with_its_placeholders_filled() {
        for lang in [Lang::Rust, Lang::Js, Lang::Python] {
            let files = render(lang, "gift-wrap", Some("{ path = \"/sdk\" }"));
            assert!(files.iter().any(|(p, _)| p == "README.md"), "{lang:?} template has no README.md");
            for (path, text) in &files {
                assert!(!text.contains("{{"), "{lang:?} {path} keeps a placeholder");
            }
            assert_eq!(files.iter().any(|(p, _)| p == "wit/step.wit"), lang.needs_wit(), "{lang:?}");
        }
        let rust = render(Lang::Rust, "gift-wrap", Some("{ path = \"/sdk\" }"));
        let manifest = &rust.iter().find(|(p, _)| p == "Cargo.toml").unwrap().1;
        assert!(
            manifest.contains("name = \"gift-wrap\"") && manifest.contains("sagahost-plugin-sdk = { path = \"/sdk\" }")
        );
        let readme = &rust.iter().find(|(p, _)| p == "README.md").unwrap().1;
        assert!(readme.contains("gift_wrap.wasm"), "{readme}");
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"C:\a "b""#), r#""C:\\a \"b\"""#);
        assert_eq!(toml_string("a\nb"), "\"a\\u000Ab\"");
    }

    #[test]
    fn a_project_is_written_whole_and_never_over_an_existing_one() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("nested/step");
        write_project(&dir, &[("a/b.txt".into(), "x".into()), ("c.txt".into(), "y".into())]).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a/b.txt")).unwrap(), "x");
        let err = write_project(&dir, &[("d.txt".into(), "z".into())]).unwrap_err();
        assert!(err.contains("already exists and is not empty"), "{err}");
        assert!(!dir.join("d.txt").exists());
        // Nothing staged is left behind.
        let leftovers: Vec<_> =
            std::fs::read_dir(root.path().join("nested")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("step")]);
        // An empty directory is filled.
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        write_project(&empty, &[("e.txt".into(), "w".into())]).unwrap();
        assert!(empty.join("e.txt").is_file());
    }
}
