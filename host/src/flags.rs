//! Command-line value parsers shared by `serve` and the subcommands.

/// A value parser whose errors never quote the value (clap's own do: "invalid value
/// 'hunter2'"), for flags that may hold a secret (`sasl.password`, a proxy URL's password).
#[derive(Clone)]
pub struct Secret<T>(pub fn(&str) -> Result<T, String>);

impl<T: Clone + Send + Sync + 'static> clap::builder::TypedValueParser for Secret<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let flag = arg.and_then(|a| a.get_long()).unwrap_or("a setting");
        let refuse = |why: String| {
            let message = format!("invalid --{flag}: {why} (the value is not shown: it may be a secret)\n");
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, message).with_cmd(cmd)
        };
        let text = value.to_str().ok_or_else(|| refuse("it is not UTF-8".to_owned()))?;
        (self.0)(text).map_err(refuse)
    }
}
