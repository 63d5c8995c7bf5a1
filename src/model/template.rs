//! `ChatTemplate`: renders a conversation with the model's own Jinja chat template through
//! minijinja, configured as transformers configures jinja2 (`trim_blocks`, `lstrip_blocks`,
//! Python string methods, `raise_exception`), so the text is byte-identical to
//! `apply_chat_template`. Models without a template get `FALLBACK_TEMPLATE`.

use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::error::LoadError;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// The template used when a model ships none: each message as `Role: content` on its own
/// lines, a blank line between messages, and `Assistant:` as the generation prompt.
pub const FALLBACK_TEMPLATE: &str = "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}";

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template source.
    pub source: String,
    bos_token: String,
    eos_token: String,
}

/// Why a conversation could not be rendered (the template raised, or failed).
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(pub String);

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source` (or the fallback when `None`).
    pub fn new(
        source: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate, LoadError> {
        let source = source.unwrap_or_else(|| FALLBACK_TEMPLATE.to_string());
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.clone())
            .map_err(|e| LoadError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    /// Renders `messages`; `add_generation_prompt` appends the assistant's turn opener.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| TemplateError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_is_plain_text() {
        let t = ChatTemplate::new(None, None, None).unwrap();
        let m = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        assert_eq!(
            t.render(&m, true).unwrap(),
            "System: Be brief.\n\nUser: Hi\n\nAssistant:"
        );
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let src =
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}";
        let t = ChatTemplate::new(Some(src.into()), None, None).unwrap();
        let e = t
            .render(&[ChatMessage::new("assistant", "x")], false)
            .unwrap_err();
        assert!(e.0.contains("user first"), "{e}");
    }

    #[test]
    fn python_string_methods_and_trim_blocks() {
        // trim_blocks drops the newline after a block tag, lstrip_blocks the indent before one.
        let src = "{% for m in messages %}\n  {% if true %}{{ m['content'].strip() }}{% endif %}|\n{% endfor %}";
        let t = ChatTemplate::new(Some(src.into()), None, None).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  a  ")], false)
                .unwrap(),
            "a|\n"
        );
    }
}
