//! How a setting is declared: once, in a [`settings!`](crate::config) block that makes the
//! section's struct field, its default, and the [`Setting`] entry (TOML key, environment
//! variables, flag of `gryt-agent run`, how a text value is split, doc) that the loader, the
//! command line and the example-file test read. Adding a setting is one entry there.

use std::path::PathBuf;

use secrecy::SecretString;

/// One setting as the operator meets it.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Its key in the TOML file and in messages (`docker.image`).
    pub key: &'static str,
    /// Environment variables that set it; when several are set, the last listed wins.
    pub env: &'static [&'static str],
    /// Its flag of `gryt-agent run`, if it has one.
    pub flag: Option<Flag>,
    /// How a value from the environment or a flag becomes the setting's value.
    pub kind: Kind,
    /// What it does: the field's doc comment, one line per doc line.
    pub doc: &'static str,
}

impl Setting {
    /// The doc as one paragraph (its lines joined, each trimmed).
    pub fn doc_text(&self) -> String {
        self.doc
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A setting's command-line flag (`--api-url URL`).
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// The long name, without the dashes.
    pub long: &'static str,
    /// What the help shows for the value (`URL`); empty for a switch.
    pub value_name: &'static str,
    /// How the command line checks the value (from the field's type).
    pub value: FlagValue,
}

/// How the command line reads a flag's value before it becomes an override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagValue {
    /// No value: present means `true`.
    Switch,
    Text,
    Path,
    /// A number the command line checks (`--port` as a u16, `--concurrency` as a usize).
    U16,
    Usize,
}

/// How a value from the environment or a flag is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One value, converted by the loader.
    Scalar,
    /// A comma-separated list (`a, b,`: blanks dropped).
    List,
    /// A whitespace-separated list (a command line).
    Words,
}

/// What a setting's type says about how it is read; the default is one text value.
pub trait Value {
    const KIND: Kind = Kind::Scalar;
    const FLAG: FlagValue = FlagValue::Text;
}

impl Value for String {}
impl Value for Option<String> {}
impl Value for Option<SecretString> {}
impl Value for Option<PathBuf> {}
impl Value for u32 {}
impl Value for u64 {}
impl Value for i64 {}
impl Value for PathBuf {
    const FLAG: FlagValue = FlagValue::Path;
}
impl Value for bool {
    const FLAG: FlagValue = FlagValue::Switch;
}
impl Value for u16 {
    const FLAG: FlagValue = FlagValue::U16;
}
impl Value for usize {
    const FLAG: FlagValue = FlagValue::Usize;
}
impl Value for Vec<String> {
    const KIND: Kind = Kind::List;
}

/// Declares one section of the settings: its struct (every field `pub`, `serde(default)`, unknown
/// keys refused), its `Default`, and its [`Setting`] entries.
///
/// Each setting is `/// doc`, `name: Type = default, env "VAR" ["VAR2"...]`, then optionally
/// `, flag "long" ["VALUE_NAME"]` (a flag of `gryt-agent run`) and `, kind Words` (how its text is
/// split, when not what the type says), ending in `;`. A `sections { name: Type, }` block nests
/// other sections; a `derived { name: Type, }` block holds values the loader computes from the
/// settings (never read from the file).
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident ($prefix:literal) {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty = $default:expr, env $($env:literal)*
                $(, flag $long:literal $($value_name:literal)?)?
                $(, kind $kind:ident)?;
            )*
        }
        $(sections {
            $( $(#[doc = $sdoc:literal])* $sfield:ident : $sty:ty, )*
        })?
        $(derived {
            $( $(#[doc = $ddoc:literal])* $dfield:ident : $dty:ty, )*
        })?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
            $($( $(#[doc = $sdoc])* pub $sfield: $sty, )*)?
            $($( $(#[doc = $ddoc])* #[serde(skip)] pub $dfield: $dty, )*)?
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    $( $field: $default, )*
                    $($( $sfield: Default::default(), )*)?
                    $($( $dfield: Default::default(), )*)?
                }
            }
        }

        impl $name {
            /// This section's own settings (not its nested sections').
            pub const DECLARED: &'static [$crate::config::Setting] = &[
                $(
                    $crate::config::Setting {
                        key: concat!($prefix, stringify!($field)),
                        env: &[$($env),*],
                        flag: settings!(@flag $ty $(, $long $(, $value_name)?)?),
                        kind: settings!(@kind $ty $(, $kind)?),
                        doc: concat!($($doc, "\n"),*),
                    },
                )*
            ];

            /// Adds this section's settings, then its nested sections', to `out`.
            pub(crate) fn collect(out: &mut Vec<&'static $crate::config::Setting>) {
                out.extend(Self::DECLARED.iter());
                $($( <$sty>::collect(out); )*)?
            }
        }
    };
    (@flag $ty:ty) => { None };
    (@flag $ty:ty, $long:literal) => { settings!(@flag $ty, $long, "") };
    (@flag $ty:ty, $long:literal, $value_name:literal) => {
        Some($crate::config::Flag {
            long: $long,
            value_name: $value_name,
            value: <$ty as $crate::config::declare::Value>::FLAG,
        })
    };
    (@kind $ty:ty) => { <$ty as $crate::config::declare::Value>::KIND };
    (@kind $ty:ty, $kind:ident) => { $crate::config::Kind::$kind };
}

pub(crate) use settings;
