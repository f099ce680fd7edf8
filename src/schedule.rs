//! Schedules: a function with `schedule=<cron>` runs with an empty body at
//! those times, in the node's local time (or `EDGEFAAS_TZ`), through the same
//! path as HTTP. A run still going when the next is due is skipped (and
//! counted); there is no catch-up after downtime: the next time is always
//! counted from now. Five fields, or six with seconds first.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use croner::errors::CronError;
use croner::parser::{CronParser, Seconds, Year};
use croner::{CivilDateTime, Cron, CronDateTime, Resolution, Weekday};
use log::{debug, info, warn};
use tz::{DateTime, TimeZone};

use crate::app::App;
use crate::events::{self, Event};
use crate::name::FunctionName;

/// Parses a schedule: 5 fields, or 6 with seconds first (POSIX day-of-month OR day-of-week).
pub fn parse(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!("{fields} fields"));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| e.to_string())
}

/// The zone schedules are read in: `EDGEFAAS_TZ` (a name from the system's
/// zoneinfo, or a POSIX TZ rule), else `/etc/localtime`, else UTC.
pub fn zone(tz: Option<&str>) -> Result<&'static TimeZone, String> {
    let zone = match tz {
        Some(name) => TimeZone::from_posix_tz(name)
            .map_err(|e| format!("EDGEFAAS_TZ: {name:?} is not a time zone ({e})"))?,
        None => TimeZone::local().unwrap_or_else(|_| TimeZone::utc()),
    };
    Ok(Box::leak(Box::new(zone)))
}

/// A unix time in a zone, as croner wants to walk it.
#[derive(Clone)]
struct Zoned {
    t: i64,
    tz: &'static TimeZone,
}

impl Zoned {
    fn dt(&self) -> Option<DateTime> {
        DateTime::from_timespec(self.t, 0, self.tz.as_ref()).ok()
    }
}

impl CronDateTime for Zoned {
    fn to_civil(&self) -> CivilDateTime {
        let d = self.dt();
        d.and_then(|d| {
            CivilDateTime::from_ymd_hms_opt(
                d.year(),
                u32::from(d.month()),
                u32::from(d.month_day()),
                u32::from(d.hour()),
                u32::from(d.minute()),
                u32::from(d.second().min(59)),
            )
        })
        .unwrap_or_else(|| {
            CivilDateTime::from_ymd_hms_opt(1970, 1, 1, 0, 0, 0).expect("the epoch is a date")
        })
    }

    fn civil_weekday(&self) -> Weekday {
        Weekday::from_days_from_sunday(self.dt().map_or(4, |d| u32::from(d.week_day())))
    }

    fn resolve_civil(&self, c: CivilDateTime) -> Result<Resolution<Self>, CronError> {
        let found = DateTime::find(
            c.year(),
            c.month() as u8,
            c.day() as u8,
            c.hour() as u8,
            c.minute() as u8,
            c.second() as u8,
            0,
            self.tz.as_ref(),
        )
        .map_err(|_| CronError::TimeSearchLimitExceeded)?;
        let at = |d: DateTime| Zoned {
            t: d.unix_time(),
            tz: self.tz,
        };
        Ok(match (found.unique(), found.into_inner().as_slice()) {
            (Some(d), _) => Resolution::Single(at(d)),
            (
                None,
                [
                    tz::datetime::FoundDateTimeKind::Normal(a),
                    tz::datetime::FoundDateTimeKind::Normal(b),
                ],
            ) => Resolution::Ambiguous(at(*a), at(*b)),
            _ => Resolution::Gap,
        })
    }

    fn checked_add_seconds(&self, s: i64) -> Option<Self> {
        Some(Zoned {
            t: self.t.checked_add(s)?,
            tz: self.tz,
        })
    }

    fn cmp_instant(&self, o: &Self) -> std::cmp::Ordering {
        self.t.cmp(&o.t)
    }
}

/// The first time after `now` (unix seconds) that `cron` names, in `tz`.
pub fn next_after(cron: &Cron, now: i64, tz: &'static TimeZone) -> Option<i64> {
    cron.find_next_occurrence(&Zoned { t: now, tz }, false)
        .ok()
        .map(|z| z.t)
}

/// Whether `cron` names any time at all (`0 0 30 2 *` never comes): checked at install.
pub fn ever_fires(cron: &Cron) -> bool {
    static UTC: std::sync::OnceLock<TimeZone> = std::sync::OnceLock::new();
    let utc: &'static TimeZone = UTC.get_or_init(TimeZone::utc);
    next_after(cron, now_secs(), utc).is_some()
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Starts the scheduler thread.
pub fn start(app: Arc<App>, tz: &'static TimeZone) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || run(&app, tz))?;
    Ok(())
}

fn run(app: &Arc<App>, tz: &'static TimeZone) {
    // name -> (its expression, parsed, next time due)
    let mut planned: HashMap<FunctionName, (String, Cron, i64)> = HashMap::new();
    let running: Arc<Mutex<HashSet<FunctionName>>> = Arc::default();
    loop {
        if app.draining() {
            return;
        }
        let now = now_secs();
        // Pick up installs, updates and deletes (a directory listing a second).
        let mut seen = HashSet::new();
        for name in app.store.list().unwrap_or_default() {
            let Some(expr) = app.store.settings(&name).schedule.clone() else {
                continue;
            };
            seen.insert(name.clone());
            if planned.get(&name).is_some_and(|(e, _, _)| *e == expr) {
                continue;
            }
            match parse(&expr) {
                Ok(cron) => {
                    // Planned even when it never comes, so it is not searched again each second.
                    let next = next_after(&cron, now, tz).unwrap_or(i64::MAX);
                    if next == i64::MAX {
                        warn!("{name}: schedule {expr:?} never comes");
                    } else {
                        info!("{name} runs on schedule {expr:?}; next at unix {next}");
                    }
                    planned.insert(name, (expr, cron, next));
                }
                Err(e) => warn!("{name}: schedule {expr:?} cannot be read: {e}"),
            }
        }
        planned.retain(|name, _| seen.contains(name));
        for (name, (_, cron, next)) in planned.iter_mut() {
            if *next > now {
                // A clock stepped back (NTP after a cold boot) brings the next time nearer.
                if *next != i64::MAX && *next - now > 60 {
                    if let Some(fresh) = next_after(cron, now, tz) {
                        *next = (*next).min(fresh);
                    }
                }
                continue;
            }
            // No catch-up: the next run is the first due after now.
            *next = next_after(cron, now, tz).unwrap_or(i64::MAX);
            if !running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone())
            {
                debug!("{name}: skipping a scheduled run, the last one still runs");
                app.metrics
                    .count("edgefaas_schedule_skips_total", name.as_str());
                continue;
            }
            app.metrics
                .count("edgefaas_schedule_runs_total", name.as_str());
            let running = running.clone();
            let done_name = name.clone();
            events::submit(
                app,
                Event {
                    name: name.clone(),
                    body: Vec::new(),
                    env: vec![("Http_X_Edgefaas_Trigger".into(), "schedule".into())],
                },
                Box::new(move |_| {
                    running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&done_name);
                }),
            );
        }
        // Wake at the next due time, or within a second to see changes.
        let next_due = planned
            .values()
            .map(|(_, _, n)| *n)
            .min()
            .unwrap_or(i64::MAX);
        let until_next_second = 1000
            - SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_millis());
        let wait = if next_due <= now_secs() + 1 {
            Duration::from_millis(u64::from(until_next_second))
        } else {
            Duration::from_secs(1)
        };
        std::thread::sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_or_six_fields_and_the_next_time_in_a_zone() {
        assert!(parse("*/5 * * * *").is_ok());
        assert!(parse("* * * * * *").is_ok());
        assert!(parse("* * * *").is_err());
        assert!(parse("61 * * * *").is_err());
        let utc: &'static TimeZone = Box::leak(Box::new(TimeZone::utc()));
        // 2026-11-30T01:02:03Z -> every 5 minutes: 01:05:00.
        let now = 1_795_998_123;
        let next = next_after(&parse("*/5 * * * *").unwrap(), now, utc).unwrap();
        assert_eq!(next, now - 123 + 300);
        // Every second: the next one.
        assert_eq!(
            next_after(&parse("* * * * * *").unwrap(), now, utc),
            Some(now + 1)
        );
        // In Berlin (UTC+1 in November), 06:00 local is 05:00 UTC.
        let berlin = zone(Some("CET-1CEST,M3.5.0,M10.5.0/3")).unwrap();
        let six = next_after(&parse("0 6 * * *").unwrap(), now, berlin).unwrap();
        assert_eq!(six % 86_400, 5 * 3600);
    }
}
