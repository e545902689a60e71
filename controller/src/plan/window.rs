//! Release windows (SPEC §14): when, in an environment's own time zone, a release may start.
//!
//! An operator writes a window as `DAYS HH:MM-HH:MM TZ`, e.g. `Mon-Thu 09:00-16:00 Europe/Berlin`.
//! Everything here is pure: the current time comes in as Unix seconds, and time zones (with
//! their daylight-saving rules) come from jiff's bundled tz database, so the answer does not
//! depend on the host's zoneinfo or clock.

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// What every parse error ends with, so an operator sees the shape that is wanted.
const EXPECTED: &str =
    "expected DAYS HH:MM-HH:MM TZ, e.g. \"Mon-Thu 09:00-16:00 Europe/Berlin\" or \"daily 22:00-02:00 UTC\"";

/// Day names, Monday first (the index is jiff's Monday-zero offset).
const DAYS: [(&str, &str); 7] = [
    ("mon", "monday"),
    ("tue", "tuesday"),
    ("wed", "wednesday"),
    ("thu", "thursday"),
    ("fri", "friday"),
    ("sat", "saturday"),
    ("sun", "sunday"),
];

/// Every day of the week, as a `days` bit set.
const ALL_DAYS: u8 = 0b111_1111;

/// How many local days `next_open` looks ahead. A weekly window opens within 7 days; only a
/// run of occurrences emptied by DST gaps could push that further, and two years is far beyond
/// any real case while still bounding the loop.
const LOOKAHEAD_DAYS: usize = 800;

/// One release window.
#[derive(Clone, Debug)]
pub struct Window {
    text: String,
    /// Bit `i` set: the window opens on the day with Monday-zero offset `i`.
    days: u8,
    start: Time,
    end: Time,
    /// The end is on the day after the start: the window crosses midnight or ends at `24:00`.
    end_next_day: bool,
    tz: TimeZone,
}

impl Window {
    /// Parses `Mon-Thu 09:00-16:00 Europe/Berlin`; the error says what is wrong and shows the expected form.
    pub fn parse(spec: &str) -> Result<Window, String> {
        let fail = |problem: String| format!("window \"{spec}\": {problem}; {EXPECTED}");
        let parts: Vec<&str> = spec.split_whitespace().collect();
        if parts.len() < 3 {
            let problem = match parts.as_slice() {
                [] => "it is empty".to_string(),
                [.., last] if parse_times(last).is_ok() => "the time zone is missing".to_string(),
                _ => format!("it has {} of the 3 parts", parts.len()),
            };
            return Err(fail(problem));
        }
        // The zone and the times never contain spaces, so everything before them is the day
        // list; gluing it back tolerates `Mon, Wed` or `Mon - Thu` as an operator may type it.
        let tz_name = parts[parts.len() - 1];
        let times = parts[parts.len() - 2];
        let days = parts[..parts.len() - 2].concat();
        let days = parse_days(&days).map_err(fail)?;
        let (start, end, end_next_day) = parse_times(times).map_err(fail)?;
        let tz = parse_zone(tz_name).map_err(fail)?;
        Ok(Window { text: spec.to_string(), days, start, end, end_next_day, tz })
    }

    /// Whether `now` (Unix seconds) falls inside this window.
    pub fn contains(&self, now: i64) -> bool {
        let Ok(ts) = Timestamp::from_second(now) else {
            // Outside jiff's range (years -9999..=9999): no window can be there.
            return false;
        };
        // An occurrence lasts at most a day (plus a DST hour) and belongs to the day it starts
        // on, so only today's and yesterday's can cover `now`; the day before that too covers
        // zones whose midnight itself can fall into a DST gap.
        let mut day = ts.to_zoned(self.tz.clone()).date();
        for _ in 0..3 {
            if let Some((open, close)) = self.occurrence(day) {
                if open <= now && now < close {
                    return true;
                }
            }
            day = match day.yesterday() {
                Ok(d) => d,
                Err(_) => break,
            };
        }
        false
    }

    /// The first instant >= now (Unix seconds) at which the window opens (now itself if it is open now).
    ///
    /// `i64::MAX` when no opening can be represented (only near the end of jiff's range).
    pub fn next_open(&self, now: i64) -> i64 {
        if self.contains(now) {
            return now;
        }
        let ts = match Timestamp::from_second(now) {
            Ok(ts) => ts,
            Err(_) if now < 0 => Timestamp::MIN,
            Err(_) => return i64::MAX,
        };
        let mut day = ts.to_zoned(self.tz.clone()).date();
        for _ in 0..LOOKAHEAD_DAYS {
            if let Some((open, _)) = self.occurrence(day) {
                if open >= now {
                    return open;
                }
            }
            day = match day.tomorrow() {
                Ok(d) => d,
                Err(_) => break,
            };
        }
        i64::MAX
    }

    /// The text it was parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The occurrence that starts on local date `day`, as `[open, close)` in Unix seconds;
    /// `None` when the window is not on that weekday, or a DST gap swallowed it whole (e.g.
    /// `02:00-03:00` in Europe/Berlin on the spring-forward Sunday), since an empty occurrence
    /// is no opening a release could use.
    fn occurrence(&self, day: Date) -> Option<(i64, i64)> {
        let bit = 1u8 << day.weekday().to_monday_zero_offset();
        if self.days & bit == 0 {
            return None;
        }
        let end_day = if self.end_next_day { day.tomorrow().ok()? } else { day };
        // `TimeZone::to_zoned` resolves local times that do not exist or occur twice with the
        // "compatible" rule: after a gap, the first of a fold.
        let open = self.tz.to_zoned(day.to_datetime(self.start)).ok()?;
        let close = self.tz.to_zoned(end_day.to_datetime(self.end)).ok()?;
        let (open, close) = (open.timestamp().as_second(), close.timestamp().as_second());
        (open < close).then_some((open, close))
    }
}

/// Parses every window of an environment (errors name the bad entry).
pub fn parse_all(specs: &[String]) -> Result<Vec<Window>, String> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| Window::parse(spec).map_err(|e| format!("windows entry {}: {e}", i + 1)))
        .collect()
}

/// None when a release may start at `now`: no windows configured, or inside one of them;
/// otherwise Some(unix seconds) of the earliest opening of any window.
pub fn wait_until(windows: &[Window], now: i64) -> Option<i64> {
    if windows.iter().any(|w| w.contains(now)) {
        return None;
    }
    windows.iter().map(|w| w.next_open(now)).min()
}

/// Formats a Unix time for operators in the zone of the first window (or UTC when there is none),
/// e.g. `2026-11-30 09:00 CET (Europe/Berlin)`.
pub fn describe(windows: &[Window], at: i64) -> String {
    let tz = windows.first().map_or(TimeZone::UTC, |w| w.tz.clone());
    let Ok(ts) = Timestamp::from_second(at) else {
        return format!("Unix time {at}");
    };
    // Built by hand rather than with strftime, whose Display can fail (and `to_string` would
    // then panic) on a zone without an abbreviation.
    let zoned = ts.to_zoned(tz.clone());
    let abbreviation = tz.to_offset_info(ts).abbreviation().to_string();
    let mut out = format!(
        "{:04}-{:02}-{:02} {:02}:{:02} {abbreviation}",
        zoned.year(),
        zoned.month(),
        zoned.day(),
        zoned.hour(),
        zoned.minute(),
    );
    // The zone's name says which rules apply ("CET" alone names several); skip it when it
    // would only repeat the abbreviation, as for UTC.
    if let Some(name) = tz.iana_name() {
        if name != abbreviation {
            out.push_str(&format!(" ({name})"));
        }
    }
    out
}

/// `daily`, a day, a range (`Mon-Thu`, or wrapping `Fri-Mon`), or a comma list of those.
fn parse_days(text: &str) -> Result<u8, String> {
    let mut days = 0u8;
    for item in text.split(',') {
        if item.eq_ignore_ascii_case("daily") {
            days = ALL_DAYS;
            continue;
        }
        match item.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (parse_day(from)?, parse_day(to)?);
                // Walk forward from `from`, wrapping past Sunday, so `Fri-Mon` is Fri..Mon.
                let mut d = from;
                loop {
                    days |= 1 << d;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days |= 1 << parse_day(item)?,
        }
    }
    Ok(days)
}

/// One day name, three letters or in full, any case; returns its Monday-zero offset.
fn parse_day(name: &str) -> Result<u8, String> {
    if name.is_empty() {
        return Err(
            "a day is missing in the day list (use Mon, Tue, …, Sun, a range like Mon-Thu, or daily)".to_string()
        );
    }
    let lower = name.to_ascii_lowercase();
    DAYS.iter()
        .position(|(short, long)| lower == *short || lower == *long)
        .and_then(|i| u8::try_from(i).ok())
        .ok_or_else(|| format!("unknown day \"{name}\" (use Mon, Tue, Wed, Thu, Fri, Sat, Sun, or daily)"))
}

/// `HH:MM-HH:MM`; returns start, end, and whether the end is on the next day.
fn parse_times(text: &str) -> Result<(Time, Time, bool), String> {
    let Some((start, end)) = text.split_once('-') else {
        return Err(format!("bad time range \"{text}\" (want HH:MM-HH:MM)"));
    };
    let start_minute = parse_clock(start)?;
    let end_minute = parse_clock(end)?;
    if start_minute == 24 * 60 {
        return Err(format!("bad time range \"{text}\": 24:00 can only end a window"));
    }
    // An end at or before the start means the window runs past midnight into the next day;
    // `24:00` is midnight of the next day too.
    let end_next_day = end_minute <= start_minute;
    let start = clock_time(start_minute)?;
    let end = clock_time(end_minute % (24 * 60))?;
    Ok((start, end, end_next_day || end_minute == 24 * 60))
}

/// `HH:MM` (24-hour, `24:00` allowed) as minutes since midnight.
fn parse_clock(text: &str) -> Result<u16, String> {
    let bad = || format!("bad time \"{text}\" (want 24-hour HH:MM, 00:00 to 24:00)");
    let (hours, minutes) = text.split_once(':').ok_or_else(bad)?;
    let digits = |s: &str, max_len: usize| !s.is_empty() && s.len() <= max_len && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(hours, 2) || !digits(minutes, 2) || minutes.len() != 2 {
        return Err(bad());
    }
    let hours: u16 = hours.parse().map_err(|_| bad())?;
    let minutes: u16 = minutes.parse().map_err(|_| bad())?;
    if minutes > 59 || hours > 24 || (hours == 24 && minutes != 0) {
        return Err(bad());
    }
    Ok(hours * 60 + minutes)
}

/// Minutes since midnight (below 24:00) as a civil time.
fn clock_time(minute_of_day: u16) -> Result<Time, String> {
    let hour = i8::try_from(minute_of_day / 60).map_err(|e| e.to_string())?;
    let minute = i8::try_from(minute_of_day % 60).map_err(|e| e.to_string())?;
    Time::new(hour, minute, 0, 0).map_err(|e| e.to_string())
}

/// An IANA zone name from jiff's bundled database; fixed offsets are refused because they
/// would silently ignore daylight saving time.
fn parse_zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|_| {
        format!("unknown time zone \"{name}\" (use an IANA name such as UTC, Europe/Berlin or America/New_York)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    /// Unix seconds of a UTC wall-clock time.
    fn utc(y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
        date(y, mo, d).at(h, mi, 0, 0).to_zoned(TimeZone::UTC).expect("valid test time").timestamp().as_second()
    }

    fn window(spec: &str) -> Window {
        Window::parse(spec).unwrap_or_else(|e| panic!("{spec}: {e}"))
    }

    fn err(spec: &str) -> String {
        match Window::parse(spec) {
            Ok(w) => panic!("{spec} parsed as {w:?}"),
            Err(e) => e,
        }
    }

    const HOUR: i64 = 3600;

    #[test]
    fn parses_good_specs() {
        for spec in [
            "Mon-Thu 09:00-16:00 Europe/Berlin",
            "Sat 10:00-12:00 UTC",
            "Fri-Mon 09:00-17:00 America/New_York",
            "Mon,Wed,Fri-Sat 9:00-10:30 UTC",
            "daily 22:00-02:00 UTC",
            "DAILY 00:00-24:00 UTC",
            "mon 08:00-09:00 utc",
            "Monday-Thursday 09:00-16:00 Europe/Berlin",
            "Mon, Wed 09:00-10:00 UTC",
            "  Tue 09:00-10:00 Asia/Tokyo  ",
        ] {
            let w = window(spec);
            assert_eq!(w.text(), spec);
        }
        assert_eq!(window("Mon-Thu 09:00-16:00 UTC").days, 0b000_1111);
        assert_eq!(window("Fri-Mon 09:00-16:00 UTC").days, 0b111_0001);
        assert_eq!(window("Mon,Wed,Fri-Sat 09:00-16:00 UTC").days, 0b011_0101);
        assert_eq!(window("daily 09:00-16:00 UTC").days, ALL_DAYS);
        assert_eq!(window("Sun-Sun 09:00-16:00 UTC").days, 0b100_0000);
    }

    #[test]
    fn rejects_bad_specs_saying_why() {
        let cases = [
            ("Mox 09:00-16:00 UTC", "unknown day \"Mox\""),
            ("Mon-Thx 09:00-16:00 UTC", "unknown day \"Thx\""),
            ("Mon,,Wed 09:00-16:00 UTC", "a day is missing"),
            ("Mon 25:00-26:00 UTC", "bad time \"25:00\""),
            ("Mon 09:60-10:00 UTC", "bad time \"09:60\""),
            ("Mon 09:00-24:01 UTC", "bad time \"24:01\""),
            ("Mon 9-16 UTC", "bad time \"9\""),
            ("Mon 09:00 UTC", "bad time range \"09:00\""),
            ("Mon 0900-1600 UTC", "bad time \"0900\""),
            ("Mon 24:00-02:00 UTC", "24:00 can only end a window"),
            ("Mon 09:00-16:00 Mars/Olympus", "unknown time zone \"Mars/Olympus\""),
            ("Mon 09:00-16:00 +02:00", "unknown time zone \"+02:00\""),
            ("Mon 09:00-16:00", "the time zone is missing"),
            ("Mon", "1 of the 3 parts"),
            ("", "it is empty"),
        ];
        for (spec, want) in cases {
            let e = err(spec);
            assert!(e.contains(want), "{spec:?}: {e:?} lacks {want:?}");
            assert!(e.contains(&format!("window \"{spec}\"")), "{e:?} names the spec");
            assert!(e.contains("expected DAYS HH:MM-HH:MM TZ"), "{e:?} shows the form");
        }
    }

    #[test]
    fn parse_all_names_the_bad_entry() {
        let good = vec!["Mon 09:00-10:00 UTC".to_string(), "Sat 10:00-12:00 UTC".to_string()];
        assert_eq!(parse_all(&good).map(|w| w.len()), Ok(2));
        assert_eq!(parse_all(&[]).map(|w| w.len()), Ok(0));
        let bad = vec!["Mon 09:00-10:00 UTC".to_string(), "Sat 10:00-12:00 Nowhere".to_string()];
        let e = parse_all(&bad).err().unwrap_or_default();
        assert!(e.starts_with("windows entry 2: window \"Sat 10:00-12:00 Nowhere\""), "{e}");
    }

    #[test]
    fn contains_and_next_open_across_a_week() {
        // 2026-01-12 is a Monday; UTC keeps the arithmetic plain.
        let w = window("Mon-Thu 09:00-16:00 UTC");
        let mon_9 = utc(2026, 1, 12, 9, 0);
        assert!(!w.contains(mon_9 - 1));
        assert!(w.contains(mon_9));
        assert!(w.contains(utc(2026, 1, 12, 15, 59)));
        assert!(!w.contains(utc(2026, 1, 12, 16, 0)), "the end is exclusive");
        assert!(w.contains(utc(2026, 1, 15, 12, 0)), "Thursday");
        assert!(!w.contains(utc(2026, 1, 16, 12, 0)), "Friday");
        assert!(!w.contains(utc(2026, 1, 18, 12, 0)), "Sunday");

        assert_eq!(w.next_open(mon_9 - HOUR), mon_9);
        assert_eq!(w.next_open(mon_9 + HOUR), mon_9 + HOUR, "open now: now");
        assert_eq!(w.next_open(utc(2026, 1, 12, 16, 0)), utc(2026, 1, 13, 9, 0));
        // After Thursday's close the next opening is next Monday.
        assert_eq!(w.next_open(utc(2026, 1, 15, 16, 0)), utc(2026, 1, 19, 9, 0));
        assert_eq!(w.next_open(utc(2026, 1, 17, 3, 0)), utc(2026, 1, 19, 9, 0));

        // A single weekday waits almost a full week.
        let sat = window("Sat 10:00-12:00 UTC");
        assert_eq!(sat.next_open(utc(2026, 1, 17, 12, 0)), utc(2026, 1, 24, 10, 0));
    }

    #[test]
    fn window_crossing_midnight_belongs_to_its_start_day() {
        // Friday 2026-01-16 22:00 to Saturday 02:00.
        let w = window("Fri 22:00-02:00 UTC");
        assert!(!w.contains(utc(2026, 1, 16, 21, 59)));
        assert!(w.contains(utc(2026, 1, 16, 22, 0)));
        assert!(w.contains(utc(2026, 1, 17, 1, 59)), "Saturday morning is Friday's window");
        assert!(!w.contains(utc(2026, 1, 17, 2, 0)));
        assert!(!w.contains(utc(2026, 1, 17, 23, 0)), "Saturday night is not in it");
        assert!(!w.contains(utc(2026, 1, 16, 1, 0)), "nor is Friday morning");
        assert_eq!(w.next_open(utc(2026, 1, 17, 2, 0)), utc(2026, 1, 23, 22, 0));

        // 24:00 ends at the next midnight; equal start and end is a whole day.
        let to_midnight = window("Sun 20:00-24:00 UTC");
        assert!(to_midnight.contains(utc(2026, 1, 18, 23, 59)));
        assert!(!to_midnight.contains(utc(2026, 1, 19, 0, 0)));
        let whole = window("Wed 06:00-06:00 UTC");
        assert!(whole.contains(utc(2026, 1, 15, 5, 59)));
        assert!(!whole.contains(utc(2026, 1, 15, 6, 0)));
    }

    #[test]
    fn wrapping_day_range() {
        let w = window("Fri-Mon 09:00-17:00 UTC");
        // 2026-01-16 Fri, 17 Sat, 18 Sun, 19 Mon, 20 Tue, 21 Wed, 22 Thu.
        for (day, open) in [(16, true), (17, true), (18, true), (19, true), (20, false), (21, false), (22, false)] {
            assert_eq!(w.contains(utc(2026, 1, day, 12, 0)), open, "2026-01-{day}");
        }
        assert_eq!(w.next_open(utc(2026, 1, 19, 17, 0)), utc(2026, 1, 23, 9, 0));
    }

    #[test]
    fn daily_window_and_comma_list() {
        let w = window("daily 22:00-02:00 UTC");
        assert!(w.contains(utc(2026, 1, 14, 0, 30)));
        assert_eq!(w.next_open(utc(2026, 1, 14, 2, 0)), utc(2026, 1, 14, 22, 0));
        let list = window("Mon,Wed,Fri-Sat 09:00-10:00 UTC");
        assert_eq!(list.next_open(utc(2026, 1, 12, 10, 0)), utc(2026, 1, 14, 9, 0));
        assert_eq!(list.next_open(utc(2026, 1, 14, 10, 0)), utc(2026, 1, 16, 9, 0));
        assert_eq!(list.next_open(utc(2026, 1, 16, 10, 0)), utc(2026, 1, 17, 9, 0));
        assert_eq!(list.next_open(utc(2026, 1, 17, 10, 0)), utc(2026, 1, 19, 9, 0));
    }

    #[test]
    fn berlin_in_winter_is_utc_plus_one() {
        let w = window("Mon-Thu 09:00-16:00 Europe/Berlin");
        // Monday 2026-01-12: 08:00-15:00 UTC.
        assert!(!w.contains(utc(2026, 1, 12, 7, 59)));
        assert!(w.contains(utc(2026, 1, 12, 8, 0)));
        assert!(w.contains(utc(2026, 1, 12, 14, 59)));
        assert!(!w.contains(utc(2026, 1, 12, 15, 0)));
        assert_eq!(w.next_open(utc(2026, 1, 12, 6, 0)), utc(2026, 1, 12, 8, 0));
    }

    #[test]
    fn berlin_in_summer_is_utc_plus_two() {
        let w = window("Mon-Thu 09:00-16:00 Europe/Berlin");
        // Monday 2026-07-06: 07:00-14:00 UTC.
        assert!(!w.contains(utc(2026, 7, 6, 6, 59)));
        assert!(w.contains(utc(2026, 7, 6, 7, 0)));
        assert!(w.contains(utc(2026, 7, 6, 13, 59)));
        assert!(!w.contains(utc(2026, 7, 6, 14, 0)));
        assert_eq!(w.next_open(utc(2026, 7, 6, 14, 0)), utc(2026, 7, 7, 7, 0));
    }

    #[test]
    fn berlin_on_the_spring_forward_day() {
        // Sunday 2026-03-29: clocks jump from 02:00 CET to 03:00 CEST (01:00 UTC).
        let day = window("Sun 09:00-16:00 Europe/Berlin");
        assert_eq!(day.next_open(utc(2026, 3, 29, 0, 0)), utc(2026, 3, 29, 7, 0));
        assert!(day.contains(utc(2026, 3, 29, 13, 59)));
        assert!(!day.contains(utc(2026, 3, 29, 14, 0)));

        // Saturday night into the switch: 22:00 CET (21:00 UTC) to 06:00 CEST (04:00 UTC),
        // one hour shorter than on other weeks.
        let night = window("Sat 22:00-06:00 Europe/Berlin");
        assert_eq!(night.next_open(utc(2026, 3, 28, 12, 0)), utc(2026, 3, 28, 21, 0));
        assert!(night.contains(utc(2026, 3, 29, 3, 59)));
        assert!(!night.contains(utc(2026, 3, 29, 4, 0)));

        // 02:30 does not exist that day: "compatible" takes the time after the gap, 03:30 CEST.
        let gap = window("Sun 02:30-04:00 Europe/Berlin");
        assert_eq!(gap.next_open(utc(2026, 3, 29, 0, 0)), utc(2026, 3, 29, 1, 30));
        assert!(!gap.contains(utc(2026, 3, 29, 1, 29)));
        assert!(gap.contains(utc(2026, 3, 29, 1, 30)));
        assert!(!gap.contains(utc(2026, 3, 29, 2, 0)));

        // A window wholly inside the gap is empty that day, so the next opening is a week on.
        let swallowed = window("Sun 02:00-03:00 Europe/Berlin");
        assert_eq!(swallowed.next_open(utc(2026, 3, 29, 0, 0)), utc(2026, 4, 5, 0, 0));
    }

    #[test]
    fn berlin_on_the_fall_back_day_takes_the_first_of_a_repeated_time() {
        // Sunday 2026-10-25: 02:00-03:00 happens twice; "compatible" opens at the first,
        // 02:30 CEST (00:30 UTC).
        let w = window("Sun 02:30-04:00 Europe/Berlin");
        assert_eq!(w.next_open(utc(2026, 10, 25, 0, 0)), utc(2026, 10, 25, 0, 30));
        assert!(w.contains(utc(2026, 10, 25, 2, 59)), "04:00 CET is 03:00 UTC");
        assert!(!w.contains(utc(2026, 10, 25, 3, 0)));
    }

    #[test]
    fn wait_until_takes_the_earliest_opening_of_several_windows() {
        let windows = parse_all(&["Mon-Thu 09:00-16:00 Europe/Berlin".to_string(), "Sat 10:00-12:00 UTC".to_string()])
            .unwrap_or_default();
        assert_eq!(windows.len(), 2);
        // Inside the Berlin window (Mon 2026-01-12 10:00 UTC = 11:00 CET): go now.
        assert_eq!(wait_until(&windows, utc(2026, 1, 12, 10, 0)), None);
        // Inside the Saturday one.
        assert_eq!(wait_until(&windows, utc(2026, 1, 17, 11, 0)), None);
        // Thursday evening: Saturday 10:00 UTC comes before Monday 08:00 UTC.
        assert_eq!(wait_until(&windows, utc(2026, 1, 15, 18, 0)), Some(utc(2026, 1, 17, 10, 0)));
        // Saturday after noon: Monday's Berlin opening.
        assert_eq!(wait_until(&windows, utc(2026, 1, 17, 12, 0)), Some(utc(2026, 1, 19, 8, 0)));
        // Monday evening: Tuesday's Berlin opening.
        assert_eq!(wait_until(&windows, utc(2026, 1, 12, 15, 0)), Some(utc(2026, 1, 13, 8, 0)));
        // No windows: releases may start any time.
        assert_eq!(wait_until(&[], utc(2026, 1, 17, 12, 0)), None);
    }

    #[test]
    fn describe_uses_the_first_windows_zone() {
        let berlin = vec![window("Mon-Thu 09:00-16:00 Europe/Berlin"), window("Sat 10:00-12:00 UTC")];
        assert_eq!(describe(&berlin, utc(2026, 11, 30, 8, 0)), "2026-11-30 09:00 CET (Europe/Berlin)");
        assert_eq!(describe(&berlin, utc(2026, 7, 6, 7, 0)), "2026-07-06 09:00 CEST (Europe/Berlin)");
        assert_eq!(describe(&[], utc(2026, 11, 30, 8, 5)), "2026-11-30 08:05 UTC");
        assert_eq!(describe(&[window("Sat 10:00-12:00 utc")], utc(2026, 1, 17, 10, 0)), "2026-01-17 10:00 UTC");
        let ny = vec![window("Mon 09:00-17:00 America/New_York")];
        assert_eq!(describe(&ny, utc(2026, 1, 12, 14, 0)), "2026-01-12 09:00 EST (America/New_York)");
    }

    #[test]
    fn extreme_times_do_not_panic() {
        let w = window("daily 09:00-16:00 Europe/Berlin");
        assert!(!w.contains(i64::MAX));
        assert!(!w.contains(i64::MIN));
        assert_eq!(w.next_open(i64::MAX), i64::MAX);
        assert!(w.next_open(i64::MIN) > i64::MIN);
        let _ = w.next_open(Timestamp::MAX.as_second());
        assert_eq!(describe(&[w], i64::MAX), format!("Unix time {}", i64::MAX));
    }
}
