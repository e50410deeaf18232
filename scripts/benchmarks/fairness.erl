%% fairness: ping-pong round-trip latency while busy processes hog the CPUs.
%% The Erlang twin of fairness.lua; see BENCHMARKS.md.
%%
%% Args (key=value): busy (number of busy-looping processes), ms (how long
%% the ping-pong pair measures).  Round trips run back to back; each one is
%% timed with the monotonic clock.  Figures: p50, p99, max in milliseconds.
-module(fairness).
-export([main/0, main/1]).

main() -> main([]).

main(Args) ->
    Busy = arg(Args, "busy", 8),
    Ms = arg(Args, "ms", 3000),
    [spawn(fun() -> busy(0) end) || _ <- lists:seq(1, Busy)],
    Pong = spawn(fun pong/0),
    timer:sleep(100),                        % let the loopers get going
    Deadline = erlang:monotonic_time(microsecond) + Ms * 1000,
    Samples = lists:sort(ping(Pong, Deadline, [])),
    Count = length(Samples),
    P50 = pct(Samples, Count, 50), P99 = pct(Samples, Count, 99),
    Max = lists:last(Samples),
    io:format("detail busy=~b ms=~b round_trips=~b p50=~.3f p99=~.3f max=~.3f ms~n",
              [Busy, Ms, Count, P50, P99, Max]),
    io:format("RESULT name=fair_p99 value=~.3f unit=ms~n", [P99]),
    io:format("RESULT name=fair_p50 value=~.3f unit=ms~n", [P50]),
    io:format("RESULT name=fair_max value=~.3f unit=ms~n", [Max]),
    io:format("RESULT name=fair_rtts value=~b unit=count~n", [Count]),
    erlang:halt(0).

%% Pure arithmetic, never blocks; only preemption gets it off the CPU.
busy(X) -> busy((X * 3 + 1) rem 1000003).

pong() -> receive {ping, From} -> From ! pong, pong() end.

ping(Pong, Deadline, Acc) ->
    T0 = erlang:monotonic_time(microsecond),
    case T0 >= Deadline of
        true -> Acc;
        false ->
            Pong ! {ping, self()},
            receive pong -> ok end,
            T1 = erlang:monotonic_time(microsecond),
            ping(Pong, Deadline, [(T1 - T0) / 1000 | Acc])
    end.

%% Nearest-rank percentile of a sorted list.
pct(Sorted, Count, P) ->
    lists:nth(max(1, min(Count, (P * Count + 99) div 100)), Sorted).

arg([], _, Default) -> Default;
arg([A | Rest], Key, Default) ->
    case string:split(A, "=") of
        [Key, V] -> list_to_integer(V);
        _ -> arg(Rest, Key, Default)
    end.
