//! The e-mail templates: a pure function from a [`Message`] to subject, plain text and simple HTML.
//!
//! Each template is written once as blocks of text and links; the text and the HTML are both
//! rendered from it, so they always say the same thing. Every interpolated value is HTML-escaped, and
//! only `http`/`https` URLs become links.

use chrono::{DateTime, Utc};
use mindroom_billing_core::ports::Message;
use mindroom_billing_core::tier::Tier;

/// The product name used in the e-mails.
const PRODUCT: &str = "MindRoom";

/// A rendered e-mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedEmail {
    /// Subject line (one line, no control characters).
    pub subject: String,
    /// Plain-text body.
    pub text: String,
    /// HTML body.
    pub html: String,
}

/// A piece of a paragraph.
enum Seg {
    Text(String),
    Link { url: String, label: String },
}

/// A block of the body.
enum Block {
    Para(Vec<Seg>),
    Pre(String),
}

fn text(s: impl Into<String>) -> Seg {
    Seg::Text(s.into())
}

fn link(url: &str, label: impl Into<String>) -> Seg {
    Seg::Link { url: url.to_owned(), label: label.into() }
}

fn para(segs: Vec<Seg>) -> Block {
    Block::Para(segs)
}

/// Renders the e-mail for a message.
pub fn render(message: &Message) -> RenderedEmail {
    let (subject, blocks) = compose(message);
    let subject: String = subject.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    RenderedEmail { text: render_text(&blocks), html: render_html(&subject, &blocks), subject }
}

fn compose(message: &Message) -> (String, Vec<Block>) {
    match message {
        Message::Welcome { tier, instance_url } => {
            let tier = tier_name(*tier);
            let mut blocks = vec![para(vec![text(format!("Welcome to {PRODUCT}!"))])];
            blocks.push(match instance_url.as_deref().filter(|u| !u.trim().is_empty()) {
                Some(url) => para(vec![
                    text(format!("Your {tier} plan is active and your {PRODUCT} instance is ready at ")),
                    link(url, url),
                    text("."),
                ]),
                None => para(vec![text(format!(
                    "Your {tier} plan is active and your {PRODUCT} instance is ready. You will find its address in your account."
                ))]),
            });
            blocks.push(para(vec![text("Reply to this e-mail if you need a hand getting started.")]));
            (format!("Your {PRODUCT} instance is ready"), blocks)
        }
        Message::PaymentFailed { amount_due, currency, grace_deadline, update_payment_url } => {
            let amount = format_amount(*amount_due, currency);
            let mut blocks =
                vec![para(vec![text(format!("We could not collect your payment of {amount} for {PRODUCT}."))])];
            blocks.push(para(vec![text(match grace_deadline {
                Some(deadline) => format!(
                    "Your instance keeps running until {}. If the payment is still outstanding then, the instance will be removed.",
                    format_datetime(*deadline)
                ),
                None => "Your instance keeps running for now, but it will be removed if the payment stays outstanding."
                    .to_owned(),
            })]));
            blocks.push(match update_payment_url.as_deref().filter(|u| !u.trim().is_empty()) {
                Some(url) => para(vec![text("Update your payment method here: "), link(url, "update payment method")]),
                None => para(vec![text("Please update your payment method in your account settings.")]),
            });
            (format!("Payment failed for your {PRODUCT} subscription"), blocks)
        }
        Message::PaymentActionRequired { amount_due, currency, grace_deadline, confirm_url } => {
            let amount = format_amount(*amount_due, currency);
            let mut blocks = vec![para(vec![text(format!(
                "Your bank asks you to confirm the payment of {amount} for your {PRODUCT} subscription. \
                 The payment goes through once you confirm it."
            ))])];
            blocks.push(match confirm_url.as_deref().filter(|u| !u.trim().is_empty()) {
                Some(url) => para(vec![text("Confirm the payment here: "), link(url, "confirm your payment")]),
                None => para(vec![text("Please confirm the payment from the invoice in your account settings.")]),
            });
            blocks.push(para(vec![text(match grace_deadline {
                Some(deadline) => format!(
                    "Your instance keeps running until {}. If the payment is not confirmed by then, the instance will be removed.",
                    format_datetime(*deadline)
                ),
                None => "Your instance keeps running for now, but it will be removed if the payment is not confirmed."
                    .to_owned(),
            })]));
            (format!("Confirm your payment for {PRODUCT}"), blocks)
        }
        Message::GraceExpired => (
            format!("Your {PRODUCT} instance has been removed"),
            vec![
                para(vec![text(format!(
                    "The grace period for the unpaid invoice of your {PRODUCT} subscription has ended, and your instance has been removed."
                ))]),
                para(vec![text("You can subscribe again at any time to get a new instance.")]),
            ],
        ),
        Message::TrialEnding { trial_end } => {
            let when = match trial_end {
                Some(end) => format!("on {}", format_date(*end)),
                None => "soon".to_owned(),
            };
            (
                format!("Your {PRODUCT} trial ends {when}"),
                vec![
                    para(vec![text(format!("Your {PRODUCT} trial ends {when}."))]),
                    para(vec![text(
                        "To keep your instance running afterwards, make sure a payment method is on file. Nothing else changes.",
                    )]),
                ],
            )
        }
        Message::Cancellation => (
            format!("Your {PRODUCT} subscription has been canceled"),
            vec![
                para(vec![text(format!("Your {PRODUCT} subscription has been canceled."))]),
                para(vec![text("Your instance will be shut down and removed. Thank you for using MindRoom.")]),
            ],
        ),
        Message::AdminAlert { subject, detail } => {
            (format!("[mindroom-billing] {subject}"), vec![Block::Pre(detail.clone())])
        }
        _ => (
            format!("A message about your {PRODUCT} subscription"),
            vec![para(vec![text(format!("There is news about your {PRODUCT} subscription; see your account."))])],
        ),
    }
}

fn tier_name(tier: Tier) -> &'static str {
    match tier {
        Tier::Free => "Free",
        Tier::Starter => "Starter",
        Tier::Professional => "Professional",
        Tier::Enterprise => "Enterprise",
    }
}

fn is_web_url(url: &str) -> bool {
    let lower = url.trim_start().to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

fn render_text(blocks: &[Block]) -> String {
    let mut out = String::new();
    for block in blocks {
        match block {
            Block::Para(segs) => {
                for seg in segs {
                    match seg {
                        Seg::Text(t) => out.push_str(t),
                        Seg::Link { url, label } if label == url => out.push_str(url),
                        Seg::Link { url, label } => {
                            out.push_str(label);
                            out.push_str(" (");
                            out.push_str(url);
                            out.push(')');
                        }
                    }
                }
            }
            Block::Pre(t) => out.push_str(t),
        }
        out.push_str("\n\n");
    }
    out.push_str("— ");
    out.push_str(PRODUCT);
    out.push('\n');
    out
}

fn render_html(subject: &str, blocks: &[Block]) -> String {
    let mut out = String::from("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>");
    out.push_str(&escape_html(subject));
    out.push_str(
        "</title></head>\n<body style=\"font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; line-height: 1.5; color: #222;\">\n",
    );
    for block in blocks {
        match block {
            Block::Para(segs) => {
                out.push_str("<p>");
                for seg in segs {
                    match seg {
                        Seg::Text(t) => out.push_str(&escape_html(t)),
                        Seg::Link { url, label } if is_web_url(url) => {
                            out.push_str("<a href=\"");
                            out.push_str(&escape_html(url.trim()));
                            out.push_str("\">");
                            out.push_str(&escape_html(label));
                            out.push_str("</a>");
                        }
                        // Not a web address: shown, never linked.
                        Seg::Link { url, label } if label == url => out.push_str(&escape_html(url)),
                        Seg::Link { url, label } => {
                            out.push_str(&escape_html(label));
                            out.push_str(" (");
                            out.push_str(&escape_html(url));
                            out.push(')');
                        }
                    }
                }
                out.push_str("</p>\n");
            }
            Block::Pre(t) => {
                out.push_str("<pre style=\"white-space: pre-wrap;\">");
                out.push_str(&escape_html(t));
                out.push_str("</pre>\n");
            }
        }
    }
    out.push_str("<p style=\"color: #888; font-size: 12px;\">— ");
    out.push_str(PRODUCT);
    out.push_str("</p>\n</body></html>\n");
    out
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Stripe's zero-decimal currencies (amounts are in whole units).
const ZERO_DECIMAL: [&str; 16] =
    ["bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"];
/// Stripe's three-decimal currencies.
const THREE_DECIMAL: [&str; 5] = ["bhd", "jod", "kwd", "omr", "tnd"];

/// Formats an amount in a currency's minor unit (Stripe's convention): `4900, "usd"` → `$49.00`,
/// `123456, "eur"` → `€1,234.56`, `5000, "jpy"` → `5,000 JPY`, `1500, "chf"` → `15.00 CHF`.
pub fn format_amount(minor: i64, currency: &str) -> String {
    let code = currency.trim().to_ascii_lowercase();
    let decimals: u32 = if ZERO_DECIMAL.contains(&code.as_str()) {
        0
    } else if THREE_DECIMAL.contains(&code.as_str()) {
        3
    } else {
        2
    };
    let abs = minor.unsigned_abs();
    let scale = 10u64.pow(decimals);
    let mut number = group_thousands(abs / scale);
    if decimals > 0 {
        let width = usize::try_from(decimals).unwrap_or(2);
        number.push_str(&format!(".{:0width$}", abs % scale));
    }
    let sign = if minor < 0 { "-" } else { "" };
    match code.as_str() {
        "usd" => format!("{sign}${number}"),
        "eur" => format!("{sign}€{number}"),
        "gbp" => format!("{sign}£{number}"),
        _ => format!("{sign}{number} {}", code.to_ascii_uppercase()),
    }
}

fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `August 5, 2026`.
fn format_date(at: DateTime<Utc>) -> String {
    at.format("%B %-d, %Y").to_string()
}

/// `August 5, 2026 at 14:30 UTC`.
fn format_datetime(at: DateTime<Utc>) -> String {
    at.format("%B %-d, %Y at %H:%M UTC").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).unwrap()
    }

    #[test]
    fn amounts() {
        assert_eq!(format_amount(4900, "usd"), "$49.00");
        assert_eq!(format_amount(4905, "USD"), "$49.05");
        assert_eq!(format_amount(123_456, "eur"), "€1,234.56");
        assert_eq!(format_amount(7, "gbp"), "£0.07");
        assert_eq!(format_amount(0, "usd"), "$0.00");
        assert_eq!(format_amount(-1999, "usd"), "-$19.99");
        assert_eq!(format_amount(5000, "jpy"), "5,000 JPY");
        assert_eq!(format_amount(1500, "chf"), "15.00 CHF");
        assert_eq!(format_amount(12_345, "kwd"), "12.345 KWD");
        assert_eq!(format_amount(100_000_000, "usd"), "$1,000,000.00");
        assert_eq!(format_amount(i64::MIN, "jpy"), "-9,223,372,036,854,775,808 JPY");
    }

    #[test]
    fn escaping() {
        assert_eq!(escape_html(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }

    #[test]
    fn welcome() {
        let e = render(&Message::Welcome {
            tier: Tier::Professional,
            instance_url: Some("https://mr-abc.mindroom.chat".into()),
        });
        assert_eq!(e.subject, "Your MindRoom instance is ready");
        assert!(e.text.contains("Your Professional plan is active"), "{}", e.text);
        assert!(e.text.contains("ready at https://mr-abc.mindroom.chat."), "{}", e.text);
        assert!(e.html.contains(r#"<a href="https://mr-abc.mindroom.chat">https://mr-abc.mindroom.chat</a>"#));
        let e = render(&Message::Welcome { tier: Tier::Free, instance_url: None });
        assert!(e.text.contains("Free plan") && !e.html.contains("<a "));
    }

    #[test]
    fn payment_failed() {
        let e = render(&Message::PaymentFailed {
            amount_due: 4900,
            currency: "usd".into(),
            grace_deadline: Some(at(1_785_604_800)), // 2026-08-01 17:20 UTC
            update_payment_url: Some("https://invoice.stripe.com/i/acct_1?a=1&b=2".into()),
        });
        assert_eq!(e.subject, "Payment failed for your MindRoom subscription");
        assert!(e.text.contains("payment of $49.00"), "{}", e.text);
        assert!(e.text.contains(&format_datetime(at(1_785_604_800))), "{}", e.text);
        assert!(e.text.contains("update payment method (https://invoice.stripe.com/i/acct_1?a=1&b=2)"), "{}", e.text);
        assert!(e.html.contains(r#"href="https://invoice.stripe.com/i/acct_1?a=1&amp;b=2""#), "{}", e.html);
        assert_eq!(format_datetime(at(1_785_604_800)), "August 1, 2026 at 17:20 UTC");

        let e = render(&Message::PaymentFailed {
            amount_due: 100,
            currency: "eur".into(),
            grace_deadline: None,
            update_payment_url: None,
        });
        assert!(e.text.contains("€1.00") && e.text.contains("account settings"), "{}", e.text);
    }

    #[test]
    fn payment_action_required() {
        let e = render(&Message::PaymentActionRequired {
            amount_due: 4900,
            currency: "eur".into(),
            grace_deadline: Some(at(1_785_604_800)),
            confirm_url: Some("https://invoice.stripe.com/i/acct_1/test_1?s=ap&x=<y>".into()),
        });
        assert_eq!(e.subject, "Confirm your payment for MindRoom");
        assert!(e.text.contains("confirm the payment of €49.00"), "{}", e.text);
        assert!(
            e.text.contains("confirm your payment (https://invoice.stripe.com/i/acct_1/test_1?s=ap&x=<y>)"),
            "{}",
            e.text
        );
        assert!(e.text.contains("running until August 1, 2026 at 17:20 UTC"), "{}", e.text);
        assert!(
            e.html.contains(
                r#"<a href="https://invoice.stripe.com/i/acct_1/test_1?s=ap&amp;x=&lt;y&gt;">confirm your payment</a>"#
            ),
            "{}",
            e.html
        );
        let e = render(&Message::PaymentActionRequired {
            amount_due: 100,
            currency: "usd".into(),
            grace_deadline: None,
            confirm_url: Some("javascript:alert(1)".into()),
        });
        assert!(!e.html.contains("<a "), "{}", e.html);
        assert!(e.text.contains("$1.00") && e.text.contains("for now"), "{}", e.text);
    }

    /// docs/emails.md shows the confirm-your-payment e-mail exactly as rendered.
    #[test]
    fn the_docs_show_the_rendered_confirm_email() {
        let e = render(&Message::PaymentActionRequired {
            amount_due: 4900,
            currency: "eur".into(),
            grace_deadline: Some(at(1_785_604_800)),
            confirm_url: Some(
                "https://invoice.stripe.com/i/acct_1PgafEB7WZ01zgkW/test_1Pgd9kB7WZ01zgkWn4Tz2Yq8".into(),
            ),
        });
        let docs =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/emails.md")).unwrap_or_default();
        let sample = format!("Subject: {}\n\n```text\n{}```\n\n```html\n{}```\n", e.subject, e.text, e.html);
        assert!(docs.contains(&sample), "docs/emails.md should contain:\n{sample}");
    }

    #[test]
    fn other_customer_messages() {
        let e = render(&Message::GraceExpired);
        assert!(e.subject.contains("removed") && e.text.contains("has been removed"));
        let e = render(&Message::TrialEnding { trial_end: Some(at(1_785_000_000)) });
        assert_eq!(e.subject, "Your MindRoom trial ends on July 25, 2026");
        let e = render(&Message::TrialEnding { trial_end: None });
        assert_eq!(e.subject, "Your MindRoom trial ends soon");
        let e = render(&Message::Cancellation);
        assert!(
            e.subject.contains("canceled") && e.html.contains("<p>Your MindRoom subscription has been canceled.</p>")
        );
    }

    #[test]
    fn admin_alert_escapes_and_keeps_one_line_subjects() {
        let e = render(&Message::AdminAlert {
            subject: "Provisioning failed\r\nBcc: victim@example.com".into(),
            detail: "Job 7 gave up: HTTP 503: <script>alert(1)</script>\nsecond line".into(),
        });
        assert_eq!(e.subject, "[mindroom-billing] Provisioning failed  Bcc: victim@example.com");
        assert!(e.text.contains("<script>alert(1)</script>\nsecond line"));
        assert!(e.html.contains("&lt;script&gt;alert(1)&lt;/script&gt;\nsecond line"), "{}", e.html);
        assert!(!e.html.contains("<script>"));
        assert!(e.html.contains("<title>[mindroom-billing] Provisioning failed  Bcc: victim@example.com</title>"));
    }

    #[test]
    fn only_web_urls_become_links() {
        let e =
            render(&Message::Welcome { tier: Tier::Starter, instance_url: Some(r#"javascript:alert("x")"#.into()) });
        assert!(!e.html.contains("<a "), "{}", e.html);
        assert!(e.html.contains("javascript:alert(&quot;x&quot;)"));
    }
}
