//! `sagahost plugin new NAME --lang rust|js|python`: a new step project from a template.
//!
//! The templates are the directories under `plugins/templates/<lang>/`, embedded in the binary
//! at build time (`build.rs` lists them), so the command works on a machine that has only the
//! `sagahost` binary. In every file, `{{name}}` becomes the plugin name, `{{name_snake}}` the
//! name with `-` turned into `_` (Rust's library name), and, for Rust, `{{sdk}}` the
//! dependency on the plugin SDK (`--sdk-path` or `--sdk-git`). JavaScript and Python projects
//! also get the WIT package the host serves (`wit/`), which their toolchains read.
//!
//! A new directory is written as a temporary sibling and renamed into place, so an interrupted
//! command leaves either nothing or a whole project. An existing empty directory (`--dir .`)
//! is kept, never replaced, so a shell inside it stays there: the project is staged in a hidden
//! directory inside it and moved out into it, or back if that fails. An existing non-empty
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
    /// Default: its default branch.
    #[arg(long)]
    sdk_git: Option<String>,
    /// Rust, with --sdk-git: a commit (or tag) to use (`rev = "..."`; cargo cannot resolve a
    /// branch given this way: use --sdk-branch).
    #[arg(long, requires = "sdk_git", conflicts_with_all = ["sdk_branch", "sdk_tag"])]
    sdk_rev: Option<String>,
    /// Rust, with --sdk-git: the branch to follow (`branch = "..."`).
    #[arg(long, requires = "sdk_git", conflicts_with_all = ["sdk_rev", "sdk_tag"])]
    sdk_branch: Option<String>,
    /// Rust, with --sdk-git: the tag to use (`tag = "..."`).
    #[arg(long, requires = "sdk_git", conflicts_with_all = ["sdk_rev", "sdk_branch"])]
    sdk_tag: Option<String>,
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
        // At most one is given (clap refuses more): cargo's `rev` takes a commit (or a tag),
        // a branch needs `branch`.
        let pin = [("rev", &args.sdk_rev), ("branch", &args.sdk_branch), ("tag", &args.sdk_tag)]
            .into_iter()
            .find_map(|(key, value)| value.as_ref().map(|v| format!(", {key} = {}", toml_string(v))))
            .unwrap_or_default();
        return Ok(format!("{{ git = {}{pin} }}", toml_string(url)));
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

/// Writes `files` under `dir`, relative to the current directory unless absolute.
fn write_project(dir: &Path, files: &[(String, String)]) -> Result<(), Refusal> {
    let base = if dir.is_absolute() {
        PathBuf::new()
    } else {
        std::env::current_dir().map_err(|e| format!("cannot read the current directory: {e}"))?
    };
    write_project_in(&base, dir, files)
}

/// Writes `files` under `base.join(dir)` (`dir` as given is what messages show). A new
/// directory is staged as a hidden sibling and renamed into place. An existing empty one (`.`,
/// the shell's current directory, say) is kept, never replaced: the project is staged in a
/// hidden directory inside it and its entries are moved out into it, or back if a move fails.
/// A non-empty one is refused.
fn write_project_in(base: &Path, dir: &Path, files: &[(String, String)]) -> Result<(), Refusal> {
    let shown = dir.display();
    // Absolute, without `.` components or a trailing `/`: `.` is the directory itself, whose
    // parent is a real directory (`Path::new(".").parent()` is `""`).
    let target: PathBuf = base.join(dir).components().collect();
    match std::fs::read_dir(&target) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(format!("{shown} already exists and is not empty; choose another --dir"));
            }
            let staging = target.join(staging_name());
            let written = stage(&staging, files).and_then(|()| move_entries(&staging, &target));
            // Empty once every entry moved; on a failure, whatever was staged.
            let _ = std::fs::remove_dir_all(&staging);
            written
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A path ending in `..` (or `/`) names no new directory.
            let Some(parent) = target.parent().filter(|_| target.file_name().is_some()) else {
                return Err(format!("{shown}: not a name for a new directory; choose another --dir"));
            };
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            let staging = parent.join(staging_name());
            let written = stage(&staging, files).and_then(|()| {
                std::fs::rename(&staging, &target).map_err(|e| format!("cannot move the new project to {shown}: {e}"))
            });
            if written.is_err() {
                let _ = std::fs::remove_dir_all(&staging);
            }
            written
        }
        Err(e) => Err(format!("{shown}: {e}")),
    }
}

/// The name of a staging directory: hidden, and unique to this run.
fn staging_name() -> String {
    format!(".sagahost-new-{}", uuid::Uuid::new_v4().simple())
}

/// Moves every entry of `staging` into `target` (on the same file system: `staging` is inside
/// it). If a move fails, or a name is taken meanwhile, the entries already moved go back to
/// `staging`, so `target` is left as it was.
fn move_entries(staging: &Path, target: &Path) -> Result<(), Refusal> {
    let names = std::fs::read_dir(staging)
        .and_then(|entries| entries.map(|entry| entry.map(|e| e.file_name())).collect::<std::io::Result<Vec<_>>>())
        .map_err(|e| format!("cannot read {}: {e}", staging.display()))?;
    let mut moved: Vec<&std::ffi::OsString> = Vec::new();
    for name in &names {
        let to = target.join(name);
        let result = if to.symlink_metadata().is_ok() {
            Err(format!("{} appeared while the project was written; nothing was written", to.display()))
        } else {
            std::fs::rename(staging.join(name), &to)
                .map_err(|e| format!("cannot move the new project's {}: {e}", to.display()))
        };
        if let Err(reason) = result {
            for name in moved.iter().rev() {
                let _ = std::fs::rename(target.join(name), staging.join(name));
            }
            return Err(reason);
        }
        moved.push(name);
    }
    Ok(())
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

    /// The entries of `dir`, sorted.
    #[cfg(unix)]
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[cfg(unix)]
    #[test]
    fn an_existing_empty_directory_is_filled_in_place_never_replaced() {
        use std::os::unix::fs::MetadataExt;

        let files: Vec<(String, String)> = vec![("a/b.txt".into(), "x".into()), ("c.txt".into(), "y".into())];
        let root = tempfile::tempdir().unwrap();
        // `--dir .`, `--dir ./` and `--dir sub/.` from where the shell is, and `--dir "$PWD"`.
        let cases: [(&str, &str, &str); 4] =
            [("dot", "dot", "."), ("slash", "slash", "./"), ("base", "base/sub", "sub/."), ("abs", "abs", "")];
        for (base, target, dir) in cases {
            let base = root.path().join(base);
            let target = root.path().join(target);
            std::fs::create_dir_all(&target).unwrap();
            let inode = std::fs::metadata(&target).unwrap().ino();
            let dir = if dir.is_empty() { target.clone() } else { PathBuf::from(dir) };
            write_project_in(&base, &dir, &files).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            assert_eq!(std::fs::metadata(&target).unwrap().ino(), inode, "{} was replaced", dir.display());
            assert_eq!(entries(&target), ["a", "c.txt"], "{}: no staging left inside", dir.display());
            assert_eq!(std::fs::read_to_string(target.join("a/b.txt")).unwrap(), "x");
            assert_eq!(std::fs::read_to_string(target.join("c.txt")).unwrap(), "y");
        }
        // Nothing staged is left next to them either.
        assert_eq!(entries(root.path()), ["abs", "base", "dot", "slash"]);
        assert_eq!(entries(&root.path().join("base")), ["sub"]);

        // Now not empty: refused, and left as it is.
        let again = write_project_in(&root.path().join("dot"), Path::new("."), &files).unwrap_err();
        assert!(again.contains(". already exists and is not empty"), "{again}");

        // A project that cannot be staged (`a` both a file and a directory) leaves the empty
        // directory empty, and the same directory.
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let inode = std::fs::metadata(&empty).unwrap().ino();
        let clash: Vec<(String, String)> = vec![("a".into(), "x".into()), ("a/b.txt".into(), "y".into())];
        let err = write_project_in(&empty, Path::new("."), &clash).unwrap_err();
        assert!(err.contains("cannot create"), "{err}");
        assert_eq!(std::fs::metadata(&empty).unwrap().ino(), inode);
        assert!(entries(&empty).is_empty(), "{:?}", entries(&empty));

        // A relative new directory is created under the base; `..` names none.
        write_project_in(root.path(), Path::new("new/step"), &files).unwrap();
        assert_eq!(entries(&root.path().join("new/step")), ["a", "c.txt"]);
        assert_eq!(entries(&root.path().join("new")), ["step"]);
        let up = write_project_in(root.path(), Path::new("missing/.."), &files).unwrap_err();
        assert!(up.contains("not a name for a new directory"), "{up}");
        assert!(!root.path().join("missing").exists());
    }

    /// `plugin new` as its command line parses.
    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        new: NewArgs,
    }

    fn parse(args: &[&str]) -> Result<NewArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("new").chain(args.iter().copied())).map(|cli| cli.new)
    }

    /// The SDK dependency line of the Cargo.toml that `plugin new gift-wrap --lang rust
    /// --sdk-git URL FLAGS` writes.
    fn sdk_line(flags: &[&str]) -> String {
        let mut argv = vec!["gift-wrap", "--lang", "rust", "--sdk-git", "https://example.com/sagahost.git"];
        argv.extend_from_slice(flags);
        let args = parse(&argv).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
        let sdk = sdk_dependency(&args).unwrap();
        let files = render(Lang::Rust, &args.name, Some(sdk.as_str()));
        let manifest = &files.iter().find(|(p, _)| p == "Cargo.toml").unwrap().1;
        manifest.lines().find(|l| l.starts_with("sagahost-plugin-sdk")).unwrap().to_owned()
    }

    #[test]
    fn a_git_sdk_is_pinned_by_rev_branch_or_tag_as_cargo_reads_them() {
        let git = r#"sagahost-plugin-sdk = { git = "https://example.com/sagahost.git""#;
        assert_eq!(sdk_line(&[]), format!("{git} }}"));
        assert_eq!(sdk_line(&["--sdk-rev", "0a1b2c3d"]), format!(r#"{git}, rev = "0a1b2c3d" }}"#));
        assert_eq!(sdk_line(&["--sdk-branch", "main"]), format!(r#"{git}, branch = "main" }}"#));
        assert_eq!(sdk_line(&["--sdk-tag", "v0.2.0"]), format!(r#"{git}, tag = "v0.2.0" }}"#));

        // One of them at most, and only with --sdk-git.
        let base = ["gift-wrap", "--lang", "rust", "--sdk-git", "https://example.com/sagahost.git"];
        for (a, b) in [("--sdk-rev", "--sdk-branch"), ("--sdk-rev", "--sdk-tag"), ("--sdk-branch", "--sdk-tag")] {
            let mut argv = base.to_vec();
            argv.extend([a, "x", b, "y"]);
            let err = parse(&argv).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict, "{a} {b}: {err}");
        }
        for flag in ["--sdk-rev", "--sdk-branch", "--sdk-tag"] {
            let err = parse(&["gift-wrap", "--lang", "rust", flag, "x"]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument, "{flag}: {err}");
        }
    }
}
