//! The flags that are settings (`--api-url`, `--port`, ...): made from the settings' one
//! declaration (`gryt_agent::config::settings`), and read back as `(key, value)` overrides,
//! which beat file and environment.

use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command, FromArgMatches, value_parser};
use gryt_agent::config::{FlagValue, Setting, settings};

/// The setting flags given on the command line, as overrides.
#[derive(Debug, Default, Clone)]
pub struct SettingFlags {
    pub overrides: Vec<(&'static str, String)>,
}

/// The settings that have a flag, with it.
fn flagged() -> impl Iterator<Item = (&'static Setting, gryt_agent::config::Flag)> {
    settings().iter().filter_map(|s| s.flag.map(|f| (*s, f)))
}

impl clap::Args for SettingFlags {
    fn augment_args(mut cmd: Command) -> Command {
        for (setting, flag) in flagged() {
            let vars = setting.env.join(", ");
            let arg = Arg::new(setting.key)
                .long(flag.long)
                .help(format!("{} [env: {vars}]", setting.doc_text()));
            let arg = match flag.value {
                FlagValue::Switch => arg.action(ArgAction::SetTrue),
                FlagValue::Text => arg.value_name(flag.value_name),
                FlagValue::Path => arg
                    .value_name(flag.value_name)
                    .value_parser(value_parser!(PathBuf)),
                FlagValue::U16 => arg
                    .value_name(flag.value_name)
                    .value_parser(value_parser!(u16)),
                FlagValue::Usize => arg
                    .value_name(flag.value_name)
                    .value_parser(value_parser!(usize)),
            };
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for SettingFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut overrides = Vec::new();
        for (setting, flag) in flagged() {
            let id = setting.key;
            let value = match flag.value {
                FlagValue::Switch => matches.get_flag(id).then(|| "true".to_owned()),
                FlagValue::Text => matches.get_one::<String>(id).cloned(),
                FlagValue::Path => matches
                    .get_one::<PathBuf>(id)
                    .map(|p| p.display().to_string()),
                FlagValue::U16 => matches.get_one::<u16>(id).map(u16::to_string),
                FlagValue::Usize => matches.get_one::<usize>(id).map(usize::to_string),
            };
            if let Some(value) = value {
                overrides.push((id, value));
            }
        }
        Ok(SettingFlags { overrides })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}
