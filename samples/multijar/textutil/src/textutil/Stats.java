package textutil;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

/** Summary statistics over whole numbers. */
public final class Stats {
    private final List<Long> values;

    public Stats(List<Long> values) {
        List<Long> sorted = new ArrayList<>(values);
        Collections.sort(sorted);
        this.values = Collections.unmodifiableList(sorted);
    }

    public int count() {
        return values.size();
    }

    public long sum() {
        long total = 0;
        for (long v : values) {
            total += v;
        }
        return total;
    }

    public long min() {
        return values.isEmpty() ? 0 : values.get(0);
    }

    public long max() {
        return values.isEmpty() ? 0 : values.get(values.size() - 1);
    }

    /** The mean, rounded half up to a whole number. */
    public long mean() {
        return values.isEmpty() ? 0 : Math.round((double) sum() / values.size());
    }

    /** The median; for an even count, the mean of the middle two, rounded down. */
    public long median() {
        int n = values.size();
        if (n == 0) {
            return 0;
        }
        return n % 2 == 1 ? values.get(n / 2) : (values.get(n / 2 - 1) + values.get(n / 2)) / 2;
    }
}
