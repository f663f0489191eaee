//! The closed sets of kinds an instance is made of.

use serde::{Deserialize, Serialize};

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<$name> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// The messaging platform an instance connects to.
    Channel { Whatsapp = "whatsapp", Discord = "discord", Slack = "slack" }
);

string_enum!(
    /// The wire contract used to call a tenant's agent.
    AgentProtocol { Omni = "omni", Automagik = "automagik", Openai = "openai" }
);

/// The media type (image, video, audio, document) a MIME type implies, as channels name them.
pub fn media_kind(mime_type: &str) -> &'static str {
    match mime_type.split('/').next().unwrap_or_default() {
        "image" => "image",
        "video" => "video",
        "audio" => "audio",
        _ => "document",
    }
}

impl Channel {
    /// The longest message the platform accepts, which is also the default reply chunk size.
    pub fn default_split_limit(self) -> u32 {
        match self {
            Channel::Whatsapp | Channel::Slack => 4000,
            Channel::Discord => 2000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for c in Channel::ALL {
            assert_eq!(Channel::parse(c.as_str()), Some(*c));
        }
        for p in AgentProtocol::ALL {
            assert_eq!(AgentProtocol::parse(&p.to_string()), Some(*p));
        }
        assert_eq!(Channel::parse("telegram"), None);
        assert_eq!(serde_json::to_string(&Channel::Whatsapp).unwrap(), "\"whatsapp\"");
    }
}
